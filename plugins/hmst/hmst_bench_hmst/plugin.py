"""Entry point of the hmst distribution: the `hmst` architecture's config, size presets, stages
and ArchSpec.

Stage 1 trains the MoE base language model (`model.HMSTModel`, memory off) with the shared loop.
Stage 2 (`--stage 2 --out R`, continuing stage 1 in R) turns the memory on (`stage_config`) and
trains it on documents longer than the window (`stage2.py`). Stage critic (`--stage critic --out
R`, after stage 1 or 2) adds the critic and trains it alone on the model's own answers
(`stage_critic.py`). Stage 3 (`--stage 3 --out R`, after any of them) adds the meta-controller
and trains it alone by PPO (`stage3.py`).

Imports neither torch nor faiss, so loading it costs nothing at CLI start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from hmst_bench import ArchSpec, ConfigError, hookimpl
from hmst_bench.arch import DENSE_SHAPES, require_positive, swiglu_width


@dataclass
class HMSTConfig:
    """A causal MoE transformer: pre-norm RMSNorm, RoPE, bias-free attention, and a feed-forward
    of n_experts SwiGLU experts (top_k per token) in every moe_every-th layer. Each expert has
    dense-llama's SwiGLU width, so a token's active feed-forward is top_k dense FFNs."""

    vocab_size: int = 8192  # the trainer sets it from the tokenizer
    max_seq_len: int = 256  # the trainer sets it from --seq-len
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_experts: int = 8
    top_k: int = 2
    moe_every: int = 1  # layers i with (i + 1) % moe_every == 0 are MoE, the others dense SwiGLU
    ffn_multiple_of: int = 64  # expert width: 8/3 * d_model rounded up to this multiple
    balance_coef: float = 0.01  # Switch load-balance loss weight
    z_loss_coef: float = 1e-3  # router z-loss weight
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    # memory (memory.py): off in stage 1, where the model is the plain MoE LM; stage 2 turns it on
    memory: bool = False
    memory_state: int = 16  # episodic SSM state size per channel
    memory_chunk: int = 16  # tokens summarised by one episodic entry (divides max_seq_len)
    episodic_slots: int = 0  # entries in the episodic buffer (0: one window's, max_seq_len / memory_chunk); older ones are consolidated
    consolidate_fraction: float = 0.5  # of the entries leaving the buffer, the most read go to the semantic store
    semantic_top_k: int = 8  # semantic entries each token retrieves
    memory_max_segments: int = 64  # longest text read with memory, in windows (max_context_len)
    memory_segments: int = 4  # stage 2: training documents of this many windows
    recall_fraction: float = 0.5  # stage 2: share of synthetic recall documents (the rest stdlib-code files)
    longterm_capacity: int = 1_000_000  # entries of the run's long-term store (memory.LongTermMemory); 0: none
    # the critic (critic.py): built by the critic stage, which trains it alone on the base's answers
    critic: bool = False
    critic_epochs: int = 100  # critic stage: passes over its training answers (fewer if the budget ends first)
    # early exit (CALM, LayerSkip; model.py): exits after these blocks (comma-separated counts,
    # e.g. "1,2"), each reading the final norm and LM head; without memory only
    exit_layers: str = ""
    early_exit_loss: float = 0.0  # weight of the exits' loss in training (weights rising with depth); 0: off
    exit_margin: float = 0.0  # decoding: a token exits once top-1 minus top-2 probability >= this (0: off)
    # the meta-controller (controller.py, policy.py, stage3.py): "none" before stage 3, which
    # builds and trains it and sets "on"; "off" keeps it but decodes with every gate full (the ablation)
    controller: str = "none"
    reward_accuracy: float = 1.0  # stage 3's reward: the seed's accuracy - 0.3 latency - 0.2 compute + 0.5 calibration
    reward_latency: float = 0.3
    reward_compute: float = 0.2
    reward_calibration: float = 0.5
    ppo_episodes: int = 16  # stage 3: queries answered per rollout
    ppo_epochs: int = 4
    ppo_minibatches: int = 4
    ppo_gamma: float = 0.99
    ppo_lambda: float = 0.95
    ppo_clip: float = 0.2
    ppo_ent_coef: float = 0.01
    ppo_target_kl: float = 0.02  # 0: no early stop
    # derived, never set by hand
    head_dim: int = field(init=False)
    expert_d_ff: int = field(init=False)
    n_moe_layers: int = field(init=False)
    memory_dim: int = field(init=False)  # entries, queries and the semantic store: d_model / 2
    memory_layer: int = field(init=False)  # the memory is read after this block: n_layers // 2
    episodic_capacity: int = field(init=False)  # episodic_slots, or one window's entries when it is 0
    exits: list = field(init=False)  # exit_layers as sorted ints (a list, as run.json stores it)

    def __post_init__(self) -> None:
        require_positive(self, "vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "n_experts", "top_k",
                         "moe_every", "ffn_multiple_of")
        if self.top_k > self.n_experts:
            raise ConfigError(f"top_k ({self.top_k}) must be at most n_experts ({self.n_experts})")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"d_model / n_heads ({self.d_model // self.n_heads}) must be even for RoPE")
        if self.moe_every > self.n_layers:
            raise ConfigError(f"moe_every ({self.moe_every}) must be at most n_layers ({self.n_layers}), or no layer has experts")
        for name in ("balance_coef", "z_loss_coef"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a number > 0, got {getattr(self, name)!r}")
        require_positive(self, "memory_state", "memory_chunk", "semantic_top_k",
                         "memory_max_segments", "memory_segments")
        for name in ("consolidate_fraction", "recall_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
        if isinstance(self.longterm_capacity, bool) or not isinstance(self.longterm_capacity, int) or self.longterm_capacity < 0:
            raise ConfigError(f"longterm_capacity must be an integer >= 0, got {self.longterm_capacity!r}")
        if isinstance(self.episodic_slots, bool) or not isinstance(self.episodic_slots, int) or self.episodic_slots < 0:
            raise ConfigError(f"episodic_slots must be an integer >= 0 (0: one window's entries), got {self.episodic_slots!r}")
        if not isinstance(self.critic, bool):
            raise ConfigError(f"critic must be true or false, got {self.critic!r}")
        require_positive(self, "critic_epochs")
        if not isinstance(self.memory, bool):
            raise ConfigError(f"memory must be true or false, got {self.memory!r}")
        if self.memory and self.max_seq_len % self.memory_chunk:
            raise ConfigError(f"memory_chunk ({self.memory_chunk}) must divide the window ({self.max_seq_len}); "
                              f"set memory_chunk to a divisor of --seq-len")
        if self.memory_segments < 2:
            raise ConfigError(f"memory_segments ({self.memory_segments}) must be at least 2: stage 2 documents are longer than the window")
        self.exits = self._exits()
        self._check_controller()
        self.head_dim = self.d_model // self.n_heads
        self.memory_dim = max(1, self.d_model // 2)
        self.memory_layer = min(self.n_layers - 1, self.n_layers // 2)
        self.episodic_capacity = self.episodic_slots or max(1, self.max_seq_len // self.memory_chunk)
        self.expert_d_ff = swiglu_width(self.d_model, self.ffn_multiple_of)
        self.n_moe_layers = self.n_layers // self.moe_every

    def _exits(self) -> list:
        text = str(self.exit_layers).strip()
        try:
            exits = sorted({int(part) for part in text.split(",") if part.strip()})
        except ValueError:
            raise ConfigError(f"exit_layers must be comma-separated block counts such as 1,2; got {self.exit_layers!r}") from None
        bad = [e for e in exits if not 1 <= e < self.n_layers]
        if bad:
            raise ConfigError(f"exit_layers: {bad[0]} is not a block to exit after; choose among 1..{self.n_layers - 1}")
        for name in ("early_exit_loss", "exit_margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (name == "exit_margin" and value > 1):
                raise ConfigError(f"{name} must be a number {'in [0, 1]' if name == 'exit_margin' else '>= 0'}, got {value!r}")
        if (self.early_exit_loss or self.exit_margin) and not exits:
            raise ConfigError("early_exit_loss and exit_margin need exits: set exit_layers, e.g. exit_layers=1,2")
        if exits and self.memory:
            raise ConfigError("early exit is built for HMST without memory; drop exit_layers for stage 2")
        return exits


    def _check_controller(self) -> None:
        if self.controller not in ("none", "on", "off"):
            raise ConfigError(f"controller must be none, on or off, got {self.controller!r}")
        for name in ("reward_accuracy", "reward_latency", "reward_compute", "reward_calibration", "ppo_ent_coef",
                     "ppo_target_kl"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        for name in ("ppo_gamma", "ppo_lambda", "ppo_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ConfigError(f"{name} must be a number in (0, 1], got {value!r}")
        require_positive(self, "ppo_episodes", "ppo_epochs", "ppo_minibatches")


# dense-llama's shapes, so hmst and dense-llama of a size share tokenizer and window
SIZES = DENSE_SHAPES


def build(config: HMSTConfig, tokenizer):
    from hmst_bench_hmst.model import HMSTModel  # torch is imported here, not at start-up

    return HMSTModel(config, tokenizer)


def run_stage(ctx) -> None:
    """Stage 1: the shared loop on the run's corpus. Stage 2: the memory on long documents.
    Stage critic: the critic on the model's own answers (stage_critic.py)."""
    from hmst_bench.train.loop import shared_loop

    if ctx.stage == "2":
        from hmst_bench_hmst.stage2 import run

        return run(ctx)
    if ctx.stage == "critic":
        from hmst_bench_hmst.stage_critic import run

        return run(ctx)
    if ctx.stage == "3":
        from hmst_bench_hmst.stage3 import run

        return run(ctx)
    return shared_loop(ctx)


def stage_config(stage: str) -> dict:
    """What a stage changes when it starts from the earlier one: stage 2 turns the memory on; the
    critic stage adds the critic (after stage 1 or 2, memory as it was); stage 3 the controller."""
    return {"2": {"memory": True}, "critic": {"critic": True}, "3": {"controller": "on"}}.get(stage, {})


HMST = ArchSpec(
    name="hmst",
    description="HMST: causal MoE transformer (stage 1) with episodic SSM and semantic FAISS memory (stage 2) a critic (stage critic) and a PPO-trained meta-controller (stage 3)",
    config_cls=HMSTConfig,
    sizes=SIZES,
    build=build,
    stage_runner=run_stage,
    stages=("1", "2", "critic", "3"),
    stage_config=stage_config,
)


@hookimpl
def register_architectures(register):
    register(HMST)
