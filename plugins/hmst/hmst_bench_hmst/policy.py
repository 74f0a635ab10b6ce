"""How HMST's meta-controller drives decoding: the gates it sets, what each setting costs
(measured), and `Episode`, the record of one query answered under the controller.

An episode is one prompt answered by the shared generation at batch 1. Its decision points:

- before every decoding step after the prefill (`HMSTModel.decode_step` calls `decide`): the
  controller reads the final hidden state the previous call left (`state["last_hidden"]`, from
  the same pass that produced the latest token) and the state vector, and picks the token gates
  (exit block, top-1 or top-k experts, episodic read, semantic read) for that step;
- after the answer, with a critic: one verification decision (accept, or have the critic score
  the answer; a score above the critic's threshold turns the answer into the abstention).

The state vector (`controller.N_STATE`): position in the context (0..1), episodic-buffer fill
(0..1, 0 without memory), the critic's P(wrong) for the answer so far (0 without a critic or
before the first answer token; from the episode's own decoding trace, so with memory without the
semantic-hit features, which the trace does not keep), and the share of the full model's
per-token FLOPs spent so far. The verification decision's critic score is the exact one (with
memory, from one more pass over prompt + answer, as `critic_features` reads it).

Only gates that can change something are decided (an exit gate needs exits, the expert gate a
base with top_k > 1, memory gates memory, verification a critic); the others stay "full" and
add nothing to the log-probability or the entropy.

Costs (`measure_costs`): for every combination of token gates, one decoding step is measured
with torch's FLOP counter after a fixed probe context (half a window, or `memory_segments` - 1/2
windows with memory, so the episodic buffer and the semantic store hold entries), FAISS's
distance work added from the memory's own counters. `latency` is a step's FLOPs (plus the
controller's own decision) over the full step's, `compute` the step's expert, memory-read and
FAISS FLOPs over the full step's: a deterministic function of the decisions, so rewards do not
depend on machine load. The table is measured once per model and kept with the episode records.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from hmst_bench_hmst.controller import N_STATE, gate_choices
from hmst_bench_hmst.model import Gates

TOKEN_GATES = ("exit", "experts", "episodic", "semantic")
MODES = ("sample", "greedy", "full")


def active_gates(config) -> tuple[str, ...]:
    """The token gates whose choices change what a step computes for this base."""
    can = {"exit": bool(config.exits), "experts": config.top_k > 1, "episodic": config.memory, "semantic": config.memory}
    return tuple(g for g in TOKEN_GATES if can[g])


def full_choice(config) -> dict[str, int]:
    """The choices that make a step the plain model's."""
    return {"exit": len(config.exits), "experts": 1, "episodic": 1, "semantic": 1, "verify": 0}


def to_gates(config, choice: dict) -> Gates:
    """Choices (ints per gate) -> the decoding step's `Gates`: exit i < len(exits) ends the step
    after block exits[i] (the last choice: every block); experts 0 is top-1 (1: the base's top_k);
    episodic / semantic 1 read that tier."""
    c = {**full_choice(config), **choice}
    return Gates(exit=config.exits[c["exit"]] if c["exit"] < len(config.exits) else None,
                 top_k=1 if c["experts"] == 0 else None, episodic=bool(c["episodic"]), semantic=bool(c["semantic"]))


@dataclass
class Costs:
    """Measured FLOPs of one decoding step per token-gate combination (keys: tuples of choices in
    `active_gates` order), of its expert + memory-read + FAISS part, and of one controller decision."""

    gates: tuple
    step: dict
    compute: dict
    controller: float

    def key(self, choice: dict) -> tuple:
        return tuple(int(choice[g]) for g in self.gates)

    def latency(self, choice: dict, consulted: bool = True) -> float:
        """FLOPs of a step under `choice`, plus the controller's decision when it was consulted,
        over the full model's step."""
        return (self.step[self.key(choice)] + (self.controller if consulted else 0.0)) / self.full_step

    def compute_share(self, choice: dict) -> float:
        full = self.compute[self._full]
        return self.compute[self.key(choice)] / full if full else 0.0

    @property
    def _full(self) -> tuple:
        return max(self.step)  # the highest choice of every gate is the full model's (see full_choice)

    @property
    def full_step(self) -> float:
        """FLOPs of the full model's decoding step."""
        return self.step[self._full]

    def as_dict(self) -> dict:
        return {"gates": list(self.gates), "controller": self.controller,
                "steps": [{"choice": list(k), "flops": self.step[k], "compute_flops": self.compute[k]} for k in sorted(self.step)]}

    @classmethod
    def from_dict(cls, d: dict) -> "Costs":
        step = {tuple(r["choice"]): r["flops"] for r in d["steps"]}
        return cls(tuple(d["gates"]), step, {tuple(r["choice"]): r["compute_flops"] for r in d["steps"]}, d["controller"])


# FlopCounterMode's module keys (class name, then attribute path; parents include their children):
# the feed-forward of every block (experts in MoE layers) and the memory reader
COMPUTE_MODULES = ("Block.ffn", "MemoryReader")


@torch.no_grad()
def measure_costs(model) -> Costs:
    """The cost table of `model` (see the module docstring); the weights decide nothing here."""
    from torch.utils.flop_counter import FlopCounterMode

    from hmst_bench.budget import _register_cpu_attention

    _register_cpu_attention()
    config = model.config
    gates = active_gates(config)
    # the measured step sits mid-window: a step that starts a new segment also writes the last one
    n = config.max_seq_len * config.memory_segments - config.max_seq_len // 2 if config.memory else max(2, config.max_seq_len // 2)
    probe = torch.randint(4, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    probe = probe.to(model.embed.weight.device)
    choices = [range(gate_choices(config)[g]) for g in gates]
    step, compute = {}, {}
    for combo in itertools.product(*choices):
        _, state = model.decode_step(probe, None)
        state = {**state, "gates": to_gates(config, dict(zip(gates, combo)))}
        mem = state.get("mem")
        before = 0 if mem is None else mem.search_flops + mem.longterm_flops
        with FlopCounterMode(display=False) as counter:
            model.decode_step(probe[:, -1:], state)
        faiss = 0 if mem is None else mem.search_flops + mem.longterm_flops - before
        counts = counter.get_flop_counts()
        moe_mem = sum(sum(counts.get(name, {}).values()) for name in COMPUTE_MODULES)
        step[combo] = float(counter.get_total_flops() + faiss)
        compute[combo] = float(moe_mem + faiss)
    controller = 0.0
    if model.controller is not None:
        hidden = torch.zeros(1, 1, config.d_model, device=probe.device, dtype=model.embed.weight.dtype)
        caches = model.controller.new_caches()
        with FlopCounterMode(display=False) as counter:
            model.controller(hidden, torch.zeros(1, 1, N_STATE, device=probe.device), caches, 0)
        controller = float(counter.get_total_flops())
    return Costs(gates, step, compute, controller)


@dataclass
class Episode:
    """One query answered under the controller (see the module docstring). `mode`: "sample"
    (stage 3's rollouts: each gate's choice drawn from the policy with `generator`), "greedy"
    (evaluation: the most probable choice) or "full" (the controller not consulted: every gate
    full, the ablation)."""

    model: object
    mode: str = "greedy"
    generator: Optional[torch.Generator] = None
    costs: Optional[Costs] = None
    # one row per decision point
    inputs: list = field(default_factory=list)  # hidden [d]
    states: list = field(default_factory=list)  # [N_STATE]
    choices: list = field(default_factory=list)  # {gate: int}
    masks: list = field(default_factory=list)  # gates decided at that point
    logprob: list = field(default_factory=list)
    value: list = field(default_factory=list)
    latency: list = field(default_factory=list)  # per token decision
    compute: list = field(default_factory=list)
    trace: list = field(default_factory=list)  # (hidden [1, d], log-probs [1, V]) per decoding call
    emitted: list = field(default_factory=list)  # answer tokens fed to decoding steps so far
    answer: list = field(default_factory=list)  # the answer's tokens before verification
    verified: bool = False
    critic_score: Optional[float] = None
    abstained: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"episode mode must be one of {MODES}, got {self.mode!r}")
        self.caches = self.model.controller.new_caches() if self.model.controller is not None else None

    # ------------------------------------------------------------------ decisions

    def _state_vector(self, state: dict) -> torch.Tensor:
        m, config = self.model, self.model.config
        pos = state.get("pos", state.get("col", 0)) / m.context_len
        mem = state.get("mem")
        fill = len(mem.buffer_ids) / config.episodic_capacity if mem is not None else 0.0
        spent = sum(self.latency) / len(self.latency) if self.latency else 1.0
        return torch.tensor([pos, fill, self._critic_so_far(), spent], dtype=torch.float32)

    def _critic_so_far(self) -> float:
        m = self.model
        if m.critic is None or not self.emitted:
            return 0.0
        from hmst_bench_hmst.critic import from_trace

        x = from_trace(self.trace, 0, self.emitted, m.config.d_model)
        return float(torch.sigmoid(m.critic(x[None].to(m.embed.weight)))) if x is not None else 0.0

    def _decide(self, hidden: torch.Tensor, vec: torch.Tensor, gates: tuple[str, ...]) -> dict:
        m = self.model
        if self.mode == "full" or m.controller is None or not gates:
            return {}
        t = len(self.inputs)
        logits, value = m.controller(hidden.reshape(1, 1, -1), vec.to(hidden.device).reshape(1, 1, -1), self.caches, t)
        choice, logprob = {}, 0.0
        for g in gates:
            dist = torch.distributions.Categorical(logits=logits[g][0, 0].float())
            pick = (torch.multinomial(dist.probs.cpu(), 1, generator=self.generator)[0] if self.mode == "sample"
                    else dist.probs.argmax()).to(dist.probs.device)
            choice[g] = int(pick)
            logprob += float(dist.log_prob(pick))
        self.inputs.append(hidden.reshape(-1).detach().float().cpu())
        self.states.append(vec)
        self.choices.append(choice)
        self.masks.append(gates)
        self.logprob.append(logprob)
        self.value.append(float(value[0, 0]))
        return choice

    def decide(self, state: dict, token: int) -> Gates:
        """The gates of the decoding step that feeds `token`, the answer's latest (called by
        decode_step before it computes the step)."""
        self.emitted.append(int(token))
        gates = active_gates(self.model.config)
        choice = self._decide(state["last_hidden"][0], self._state_vector(state), gates)
        if self.costs is not None:
            full = {**full_choice(self.model.config), **choice}
            self.latency.append(self.costs.latency(full, consulted=self.mode != "full" and bool(gates)))
            self.compute.append(self.costs.compute_share(full))
        return to_gates(self.model.config, choice)

    def record(self, state: dict, logprobs: torch.Tensor) -> None:
        """Keep what a decoding call produced (the critic reads the answer from it)."""
        self.trace.append((state["last_hidden"].detach(), logprobs.detach()))

    def finish(self, prompt: list, answer: list, verify: bool = True) -> list:
        """The verification decision after the answer (with a critic, when `verify`); returns the
        answer's tokens (the abstention's when the critic rejects it)."""
        m = self.model
        self.answer = list(answer)
        if m.critic is None or not verify:
            return answer
        vec = self._state_vector({"pos": len(prompt) + len(answer)})
        hidden = self.trace[-1][0][0] if self.trace else torch.zeros(m.config.d_model)
        choice = self._decide(hidden, vec, ("verify",)) if self.mode != "full" else {}
        self.verified = bool(choice.get("verify", 0))
        if not self.verified:
            return answer
        from hmst_bench_hmst.critic import features, from_trace

        x = from_trace(self.trace, 0, answer, m.config.d_model) if m.memory is None else None
        if x is None:
            x = features(m, [prompt], [answer])[0]
        with torch.no_grad():
            self.critic_score = float(torch.sigmoid(m.critic(x[None].to(m.embed.weight))))
        threshold = m.hallucination_threshold
        self.abstained = threshold is not None and self.critic_score > threshold
        if self.abstained:
            from hmst_bench.eval.hallucination import ABSTAIN_ANSWER

            return m.tokenizer.encode(" " + ABSTAIN_ANSWER.rstrip("."), add_special_tokens=False)
        return answer


def calibration(verified: bool, critic_score: Optional[float], right: bool) -> float:
    """1 - Brier score of the confidence the answer is given with: the critic's P(right) when it
    checked the answer, else 1 (an unchecked answer is asserted)."""
    confidence = 1.0 - critic_score if verified and critic_score is not None else 1.0
    return 1.0 - (confidence - float(right)) ** 2


def rewards(episode: Episode, right: bool, weights: dict) -> list[float]:
    """Per-decision rewards: each token decision -(w_lat latency + w_comp compute) / n_token
    decisions, and the last decision + w_acc accuracy + w_cal calibration, so that the
    undiscounted return is the seed's reward: accuracy - 0.3 latency - 0.2 compute + 0.5
    calibration with latency and compute averaged over the answer's tokens. Accuracy is 1 for a
    right answer that was not withheld, else 0."""
    n = len(episode.choices)
    tokens = [i for i, mask in enumerate(episode.masks) if mask != ("verify",)]
    out = [0.0] * n
    for i, k in zip(tokens, range(len(tokens))):
        out[i] = -(weights["latency"] * episode.latency[k] + weights["compute"] * episode.compute[k]) / len(tokens)
    if n:
        accuracy = float(right and not episode.abstained)
        out[-1] += weights["accuracy"] * accuracy + weights["calibration"] * calibration(episode.verified, episode.critic_score, right)
    return out


def terms(episodes: list, rights: list, weights: dict) -> dict:
    """The mean of each reward term over a batch of episodes (what metrics.jsonl logs)."""
    if not episodes:
        return {}
    lat = [sum(e.latency) / len(e.latency) for e in episodes if e.latency]
    comp = [sum(e.compute) / len(e.compute) for e in episodes if e.compute]
    return {"accuracy": sum(float(r and not e.abstained) for e, r in zip(episodes, rights)) / len(episodes),
            "latency": sum(lat) / len(lat) if lat else math.nan, "compute": sum(comp) / len(comp) if comp else math.nan,
            "calibration": sum(calibration(e.verified, e.critic_score, r) for e, r in zip(episodes, rights)) / len(episodes)}
