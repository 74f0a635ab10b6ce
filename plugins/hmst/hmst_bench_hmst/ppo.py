"""PPO with GAE over multi-step episodes: the algorithm HMST's meta-controller is trained with.

Written after CleanRL's ppo.py (read, not copied), for episodes of many decisions, with its
formulation: bootstrapped GAE with done masks, advantages normalised per minibatch, the clipped
policy ratio, the clipped value loss, an entropy bonus, an approximate-KL early stop and gradient
clipping. Hand-written because no maintained library in the project's dependencies provides PPO
for a policy that lives inside our own model (the controller reads the base's hidden states).

Conventions: a rollout is T steps of one or more parallel environments, tensors [T] or [T, N].
`dones[t] = 1` when the episode ended with step t's action (the transition t -> t+1 is
terminal), so nothing is bootstrapped across it; `last_value` is V of the state after the last
step (used unless that step was terminal).

    delta_t = r_t + gamma * V_{t+1} * (1 - done_t) - V_t
    A_t     = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}
    R_t     = A_t + V_t                       (the value target)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each shaped like `rewards` ([T] or [T, N]); see the module docstring."""
    advantages = torch.zeros_like(rewards, dtype=torch.float64)
    running = torch.zeros_like(last_value, dtype=torch.float64)
    next_value = last_value.double()
    for t in reversed(range(rewards.shape[0])):
        live = 1.0 - dones[t].double()
        delta = rewards[t].double() + gamma * next_value * live - values[t].double()
        running = delta + gamma * lam * live * running
        advantages[t] = running
        next_value = values[t].double()
    advantages = advantages.to(rewards.dtype)
    return advantages, advantages + values


@dataclass
class PPOConfig:
    clip_coef: float = 0.2  # policy ratio clipped to [1 - c, 1 + c]
    vf_clip: float = 0.2  # the value's change clipped to +-this in the clipped value loss
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    epochs: int = 4  # passes over a rollout
    minibatches: int = 4
    target_kl: Optional[float] = 0.02  # stop the update's epochs once approx KL exceeds this (None: never)
    max_grad_norm: float = 0.5
    gamma: float = 0.99
    lam: float = 0.95
    norm_adv: bool = True


def ppo_loss(new_logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor,
             new_value: torch.Tensor, old_value: torch.Tensor, returns: torch.Tensor, entropy: torch.Tensor,
             cfg: PPOConfig) -> dict:
    """The PPO objective of one minibatch (all tensors [M]) and its statistics:

    ratio = exp(new - old logprob); pg = mean(max(-A ratio, -A clip(ratio, 1 +- clip)));
    v = 0.5 mean(max((V - R)^2, (V_old + clip(V - V_old, +-vf_clip) - R)^2));
    loss = pg - ent_coef * mean(entropy) + vf_coef * v; approx_kl = mean((ratio - 1) - log ratio)
    (the low-variance estimator); clip_frac = share of |ratio - 1| > clip. A is normalised over
    the minibatch when `norm_adv`."""
    log_ratio = new_logprob - old_logprob
    ratio = log_ratio.exp()
    adv = advantages
    if cfg.norm_adv and adv.numel() > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
    clipped = old_value + (new_value - old_value).clamp(-cfg.vf_clip, cfg.vf_clip)
    v = 0.5 * torch.max((new_value - returns) ** 2, (clipped - returns) ** 2).mean()
    ent = entropy.mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clip_frac = ((ratio - 1).abs() > cfg.clip_coef).float().mean()
    return {"loss": pg - cfg.ent_coef * ent + cfg.vf_coef * v, "pg_loss": pg.detach(), "v_loss": v.detach(),
            "entropy": ent.detach(), "approx_kl": approx_kl, "clip_frac": clip_frac}


def update(evaluate: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
           params, optimizer: torch.optim.Optimizer, batch: dict, cfg: PPOConfig,
           generator: torch.Generator, run: Optional[Callable[[Callable], object]] = None) -> list[dict]:
    """One PPO update over a flattened rollout `batch` ({"index", "logprob", "value", "advantages",
    "returns"}, each [B]; "index" is what `evaluate` needs to recompute the minibatch's
    (new logprob, entropy, value) under the current policy). Minibatches are shuffled with
    `generator`; the epochs stop early once a minibatch's approx KL exceeds `target_kl`.
    `run(work)`, when given, runs each minibatch's forward and backward (a FLOP meter: the
    gradient clipping and the optimiser step are not model FLOPs) and returns work's result.
    Returns each minibatch's statistics (loss terms, approx_kl, clip_frac, grad_norm)."""
    n = batch["logprob"].shape[0]
    size = max(1, n // cfg.minibatches)
    stats = []
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, size):
            rows = order[start : start + size]
            def work():
                logprob, entropy, value = evaluate(batch["index"][rows])
                out = ppo_loss(logprob, batch["logprob"][rows], batch["advantages"][rows], value, batch["value"][rows],
                               batch["returns"][rows], entropy, cfg)
                out["loss"].backward()
                return out

            optimizer.zero_grad(set_to_none=True)
            out = run(work) if run is not None else work()
            out["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            stats.append({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()})
        if cfg.target_kl is not None and stats[-1]["approx_kl"] > cfg.target_kl:
            break
    return stats
