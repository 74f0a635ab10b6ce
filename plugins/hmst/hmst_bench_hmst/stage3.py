"""HMST's stage 3: the meta-controller trained by PPO with GAE, the base (and critic) frozen.

`hmst-bench train --stage 3 --out R --budget B` continues R's last stage (1, 2 or critic); the
trainer builds the model with `controller="on"` (the plugin's `stage_config`) and only the
controller's parameters reach the optimiser (`ctx.train_only`).

Episodes (`policy.Episode`): answering one training query greedily under the controller, whose
gate choices are sampled from its policy. Queries come from the run's training data only, never
from a test split:
- with a sized knowledge base that answers questions (`synthetic-facts:...,qa=F`): the critic
  stage's training questions (`facts.critic_questions`, split "train": questions the corpus
  answers and questions about held-out invented entities), in factqa's prompt; right = factqa's
  judge says "correct";
- with memory: synthetic recall documents of stage 2's training split (`LongDocs`, 4 needles,
  `memory_segments` windows) cut before their answer; right = the answer starts with the digits.
With both, each query is either with probability 1/2.

Each update: `ppo_episodes` episodes (queries and the controller's draws a pure function of the
seed and the update's index), per-decision rewards (`policy.rewards`), GAE(gamma, lambda) per
episode with its last decision terminal, then `ppo.update` (clipped ratio, clipped value loss,
per-minibatch advantage normalisation, entropy bonus, approx-KL early stop, gradient clipping).
The PPO minibatches re-run the controller over whole episodes (it is causal, so each decision
sees exactly what it saw in the rollout) and pick the sampled decisions.

Budget: the gates' cost table, every rollout (the base's and the controller's passes) and every
update are measured by the shared meter and charged as they happen; the stage stops before an
update would pass the budget. Checkpoints come after every update (the rollout buffer is then
empty, and the next rollout's randomness is a function of its index), so `--resume` continues
exactly; a rollout cut by a kill is redone identically and charged once. metrics.jsonl logs per
update (`kind: ppo`): the reward and each term, gate rates, value loss, clip fraction, approx KL,
entropy, episodes and decisions.
"""

from __future__ import annotations

import random

import torch

from hmst_bench.train.context import TrainContext
from hmst_bench.train.loop import TrainError

LEARN_LOGS = ("pg_loss", "v_loss", "entropy", "approx_kl", "clip_frac", "grad_norm")


def run(ctx: TrainContext) -> None:
    from hmst_bench_hmst import ppo

    model, config = ctx.model, ctx.config
    if model.controller is None or config.controller != "on":
        raise TrainError(f"stage 3 trains the meta-controller of a trained run: train stage 1 first, then hmst-bench "
                         f"train --stage 3 --out {ctx.run_dir} (without --set controller=...)")
    if ctx.budget.kind != "flops":
        raise TrainError("stage 3 takes a FLOPs budget (e.g. --budget 1e12), not a token budget")
    queries = Queries(ctx)
    ctx.train_only(model.controller)
    state = ctx.restore() if ctx.resuming else {}
    if not ctx.resuming:  # the gates' cost table, saved with the run's artifacts (checkpoints included)
        model._costs = None
        _, flops = ctx.meter.measure(model.costs, model)
        ctx.meter.add(flops, 0, steps=0)
        ctx.log(kind="ppo_costs", flops=flops, costs=model._costs.as_dict())
    cfg = ppo.PPOConfig(clip_coef=config.ppo_clip, vf_clip=config.ppo_clip, ent_coef=config.ppo_ent_coef,
                        epochs=config.ppo_epochs, minibatches=config.ppo_minibatches,
                        target_kl=config.ppo_target_kl or None, gamma=config.ppo_gamma, lam=config.ppo_lambda)
    weights = {"accuracy": config.reward_accuracy, "latency": config.reward_latency, "compute": config.reward_compute,
               "calibration": config.reward_calibration}
    last = state.get("last_cost")  # FLOPs of the last rollout and update: the next one is refused past the budget
    while ctx.stop_signal is None:
        if last is not None and (ctx.meter.flops + last > ctx.budget.amount or (ctx.total_steps and ctx.step >= ctx.total_steps)):
            break
        (episodes, rights, tokens), rollout = ctx.meter.measure(lambda: _rollout(ctx, queries), model)
        if ctx.stop_signal is not None:
            break
        if not ctx.total_steps:  # plan from the first rollout: the updates are a few percent on top
            ctx.plan(max(1, int((ctx.budget.amount - ctx.meter.flops) // (1.1 * rollout))))
        batch = _buffer(episodes, rights, weights, cfg)
        stats, spent = [], [0.0]
        if batch is not None:

            def measured(work):  # each minibatch's forward and backward, charged
                out, flops = ctx.meter.measure(work, model)
                spent[0] += flops
                return out

            gen = torch.Generator().manual_seed(_seed(ctx, "update"))
            model.controller.train()
            stats = ppo.update(lambda rows: _evaluate(model, batch, rows), list(model.controller.parameters()),
                               ctx.optimizer, batch, cfg, gen, run=measured)
            model.controller.eval()
            ctx.last_loss = sum(s["loss"] for s in stats) / len(stats)
        learn = spent[0]
        if ctx.scheduler is not None:
            ctx.scheduler.step()
        last = rollout + learn
        state["last_cost"] = last
        ctx.meter.add(last, tokens)
        ctx.step += 1
        _log(ctx, episodes, rights, weights, stats, batch, last)
        ctx.checkpoint(state)
        ctx.on_progress(ctx)


def _seed(ctx: TrainContext, what: str) -> int:
    return random.Random(f"stage3:{ctx.recipe.seed}:{ctx.step}:{what}").getrandbits(63)


class Queries:
    """Stage 3's training queries: factqa-style questions and, with memory, recall documents."""

    def __init__(self, ctx: TrainContext):
        from hmst_bench.data import facts
        from hmst_bench.eval import hallucination
        from hmst_bench.train.rundir import read_info

        self.ctx, self.tok = ctx, ctx.tokenizer
        corpus = read_info(ctx.run_dir).get("corpus_spec")
        size = facts.FactsSpec.parse(corpus) if facts.is_facts(corpus) else None
        self.questions = []
        if size is not None and size.qa:
            self.questions = [q for q in facts.critic_questions(facts.SEED, size) if q["split"] == "train"]
            try:
                self.primer = hallucination.documents(facts.SEED, size)[1]
            except ValueError as exc:
                raise TrainError(str(exc)) from None
        self.docs = None
        if ctx.config.memory:
            from hmst_bench_hmst.longdocs import LongDocs

            self.docs = LongDocs(self.tok, ctx.config.max_seq_len * ctx.config.memory_segments, recall_fraction=1.0)
        if not self.questions and self.docs is None:
            raise TrainError(f"stage 3 needs training queries: a run on --corpus synthetic-facts:entities=N,repeat=R,qa=F "
                             f"(F > 0), or memory (stage 2); {corpus!r} without memory has none")

    def draw(self, rng: random.Random) -> tuple[list[int], str, callable]:
        """(prompt ids, stop strings' reference, judge(answer text) -> right)."""
        from hmst_bench.eval import hallucination

        if self.questions and (self.docs is None or rng.random() < 0.5):
            q = self.questions[rng.randrange(len(self.questions))]
            prompt = hallucination.prompt(q["question"], self.primer)
            return (self.tok.encode(prompt, add_special_tokens=False),
                    lambda text: hallucination.judge(hallucination.first_line(text), q["answer"], q["seen"]) == "correct")
        doc = self.docs._document("train", True, rng.getrandbits(63))
        text = self.tok.decode(doc[1:-1].tolist())
        head, _, digits = text.rpartition("Answer:")
        digits = digits.strip()
        return ([self.tok.bos_token_id] if self.tok.bos_token_id is not None else []) + \
            self.tok.encode(head + "Answer:", add_special_tokens=False), \
            lambda answer: hallucination.first_line(answer).startswith(digits)


def _rollout(ctx: TrainContext, queries: Queries) -> tuple[list, list]:
    from hmst_bench.eval import hallucination
    from hmst_bench.generation import Sampling
    from hmst_bench.eval.lm import HmstBenchLM
    from hmst_bench.train.rundir import Run

    model = ctx.model
    model.eval()  # the critic's dropout off: rollouts answer as evaluation does
    lm = HmstBenchLM(run=Run(ctx.run_dir, model, ctx.tokenizer, ctx.spec, {}, ctx.config), device=str(ctx.accelerator.device),
                     batch_size=1, progress=False)
    gen = hallucination.GREEDY_GENERATION
    stop = [lm.eot_token_id, lm.stop_when(gen["until"])]
    rng = random.Random(_seed(ctx, "queries"))
    choices = torch.Generator().manual_seed(_seed(ctx, "choices"))
    episodes, rights, tokens = [], [], 0
    with torch.no_grad():
        for _ in range(ctx.config.ppo_episodes):
            prompt, judge = queries.draw(rng)
            prompt = prompt[-(model.context_len - gen["max_gen_toks"]):]
            answer, episode = model.run_episode(prompt, gen["max_gen_toks"], Sampling(0.0, 1.0, 0), stop,
                                                generator=choices, mode="sample")
            episodes.append(episode)
            rights.append(bool(judge(lm.tok_decode(episode.answer))))  # the answer before any abstention
            tokens += len(prompt) + len(answer)
            if ctx.stop_signal is not None:
                break
    return episodes, rights, tokens


def _buffer(episodes: list, rights: list, weights: dict, cfg) -> dict | None:
    """The flattened rollout: per decision its episode and index, log-prob, value, advantage
    and return (GAE within each episode, its last decision terminal)."""
    from hmst_bench_hmst.policy import rewards
    from hmst_bench_hmst.ppo import gae

    rows = []
    for e_i, (episode, right) in enumerate(zip(episodes, rights)):
        n = len(episode.choices)
        if not n:
            continue
        r = torch.tensor(rewards(episode, right, weights), dtype=torch.float32)
        v = torch.tensor(episode.value, dtype=torch.float32)
        done = torch.zeros(n)
        done[-1] = 1.0
        adv, ret = gae(r, v, done, torch.zeros(()), cfg.gamma, cfg.lam)
        rows += [(e_i, t, episode.logprob[t], episode.value[t], float(adv[t]), float(ret[t]), float(r[t])) for t in range(n)]
    if not rows:
        return None
    cols = list(zip(*rows))
    return {"index": torch.arange(len(rows)), "episode": torch.tensor(cols[0]), "t": torch.tensor(cols[1]),
            "logprob": torch.tensor(cols[2]), "value": torch.tensor(cols[3]), "advantages": torch.tensor(cols[4]),
            "returns": torch.tensor(cols[5]), "rewards": torch.tensor(cols[6]), "episodes": episodes}


def _evaluate(model, batch: dict, rows: torch.Tensor):
    """(log-prob, entropy, value) of decisions `rows` under the current controller: its episodes
    re-run whole (padded at the end; the controller is causal) and the decisions picked."""
    eps = sorted(set(batch["episode"][rows].tolist()))
    episodes = [batch["episodes"][e] for e in eps]
    longest = max(len(e.inputs) for e in episodes)
    weight = next(model.controller.parameters())
    device = weight.device
    hidden = torch.zeros(len(eps), longest, model.config.d_model, device=device, dtype=weight.dtype)
    state = torch.zeros(len(eps), longest, episodes[0].states[0].numel(), device=device)
    for i, e in enumerate(episodes):
        hidden[i, : len(e.inputs)] = torch.stack(e.inputs).to(device)
        state[i, : len(e.states)] = torch.stack(e.states).to(device)
    logits, value = model.controller(hidden, state)
    where = {e: i for i, e in enumerate(eps)}
    lp, ent, val = [], [], []
    for r in rows.tolist():
        i, t = where[int(batch["episode"][r])], int(batch["t"][r])
        e = episodes[i]
        logp, h = 0.0, 0.0
        for g in e.masks[t]:
            dist = torch.distributions.Categorical(logits=logits[g][i, t].float())
            logp = logp + dist.log_prob(torch.tensor(e.choices[t][g], device=device))
            h = h + dist.entropy()
        lp.append(logp)
        ent.append(h)
        val.append(value[i, t])
    return torch.stack(lp), torch.stack(ent), torch.stack(val)


def _log(ctx: TrainContext, episodes, rights, weights, stats, batch, flops) -> None:
    from hmst_bench_hmst.policy import terms

    rates: dict = {}
    for e in episodes:
        for choice in e.choices:
            for g, v in choice.items():
                rates.setdefault(f"rate_{g}_{v}", 0)
                rates[f"rate_{g}_{v}"] += 1
    per_gate: dict = {}
    for key, n in rates.items():
        per_gate[key.rsplit("_", 1)[0]] = per_gate.get(key.rsplit("_", 1)[0], 0) + n
    rates = {k: n / per_gate[k.rsplit("_", 1)[0]] for k, n in rates.items()}
    learn = {k: sum(s[k] for s in stats) / len(stats) for k in LEARN_LOGS} if stats else {}
    returns = [float(batch["rewards"][batch["episode"] == i].sum()) for i in sorted(set(batch["episode"].tolist()))] if batch else []
    ctx.log(kind="ppo", update=ctx.step, episodes=len(episodes), decisions=0 if batch is None else len(batch["index"]),
            reward=sum(returns) / len(returns) if returns else None, update_flops=flops,
            minibatches=len(stats), **{f"term_{k}": v for k, v in terms(episodes, rights, weights).items()},
            verify_rate=sum(e.verified for e in episodes) / max(1, len(episodes)),
            abstained=sum(e.abstained for e in episodes) / max(1, len(episodes)), **rates, **learn)
