"""The model contract, version 2: `LanguageModel`, the base class of every architecture's model.

An `ArchSpec.build(config, tokenizer)` returns an instance of a subclass. The trainer, the
evaluator and the reports call only the methods below, with these signatures, and never probe a
model for what it can do: what a model may lack is a declared class attribute.

Required (abstract):
    loss(batch) -> (loss, aux)                     training objective for {"input_ids", "labels"}
    token_logprobs(input_ids, targets) -> [B, T]   exact log p(targets[:, t] | input_ids[:, :t+1])
    next_token_logprobs(input_ids, lengths=None)   [B, V] after each row's last (or lengths[b]-th) token

Optional, each with a correct default: `score`, `generate` (batched), `decode_step` (only with
`kv_cache`), `score_continuations` (one context, several continuations), `num_active_params`,
`extra_flops`, `flop_shares`, `prepare`, `save_artifacts` / `load_artifacts`, `export`,
`hallucination_scores` (only with `hallucination_detector`), `take_decoding_stats`.

Declared capabilities:
    max_seq_len            the attention window (set by the subclass)
    max_context_len        None, or how far back the model reads through a memory (HMST)
    kv_cache               True: `decode_step` implements exact cached decoding
    kv_cache_pads          (with kv_cache) True: its prefill takes left-padded rows; False: the
                           shared generation batches only prompts of equal length
    hallucination_detector True: `hallucination_scores` is the model's own wrong-answer detector
    hallucination_threshold (with the detector) the score above which it would withhold an answer,
                           chosen on its own validation data, or None; `eval --verify` uses it
    hallucination_stats    (with the detector) numbers its last `hallucination_scores` call reports
                           (HMST: how many answers' features came from the generating pass)
    extra_flops_covers     executed ops without a FLOP formula whose cost `extra_flops` counts

Conventions: `input_ids` [B, T] hold real tokens; `token_logprobs`/`score` may see rows
right-padded, with -100 targets at the padding, so a position's value must not depend on later
tokens (any causal model satisfies this); position t of `labels`/`targets` is the token that
follows `input_ids[:, t]` (already shifted), and -100 marks a position to ignore.
"""

from __future__ import annotations

import abc
from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence

import torch

from hmst_bench.arch import IGNORE_INDEX

CONTRACT_VERSION = 2


class LanguageModel(torch.nn.Module, metaclass=abc.ABCMeta):
    """Base class of every hmst-bench model (an `nn.Module`); see the module docstring."""

    max_seq_len: int
    max_context_len: Optional[int] = None
    kv_cache: bool = False
    kv_cache_pads: bool = True
    hallucination_detector: bool = False
    hallucination_threshold: Optional[float] = None
    hallucination_stats: Mapping[str, Any] = MappingProxyType({})  # what its last hallucination_scores call reports
    extra_flops_covers: tuple[str, ...] = ()

    @property
    def context_len(self) -> int:
        """The most tokens one query may hold: the window, or `max_context_len` when set."""
        return int(self.max_context_len or self.max_seq_len)

    # ------------------------------------------------------------------ required

    @abc.abstractmethod
    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Training objective; auxiliary losses and statistics reported apart in the dict."""

    @abc.abstractmethod
    def token_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[B, T] float32 log-probs of `targets`, 0 where the target is -100."""

    @abc.abstractmethod
    def next_token_logprobs(self, input_ids: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, V] float32 log-distribution of the next token: after each row's last token (the
        query cut to its last `context_len` tokens), or, with `lengths` ([B] ints, rows
        right-padded), after row b's first lengths[b] tokens."""

    # ------------------------------------------------------------------ scoring

    def score(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs [B, T], is-argmax [B, T]): `token_logprobs`, and whether each target is the
        most likely token (lm-eval's is_greedy); -100 positions count as argmax. This default
        asks `next_token_logprobs` once per scored column; a model with a softmax head does it
        from the same forward pass (`modeling.SoftmaxLM`)."""
        logprobs = self.token_logprobs(input_ids, targets)
        greedy = torch.ones(targets.shape, dtype=torch.bool, device=targets.device)
        live = targets != IGNORE_INDEX
        for t in live.any(dim=0).nonzero().flatten().tolist():
            rows = live[:, t].nonzero().flatten()
            best = self.next_token_logprobs(input_ids[rows, : t + 1]).argmax(-1)
            greedy[rows, t] = best.to(targets.device) == targets[rows, t]
        return logprobs, greedy

    def score_continuations(self, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                            ) -> list[list[tuple[float, bool]]]:
        """For each (context, continuations) group: (sum of log-probs, all greedy) of every
        continuation after that context, each whole row (context + continuation) within
        `context_len`. The default scores all the rows in one right-padded `score` call; a model
        that reads far past its window overrides it to read each shared context once (HMST)."""
        from hmst_bench.generation import right_padded

        rows, spans = [], []
        for context, continuations in groups:
            for c in continuations:
                rows.append(list(context) + list(c))
                spans.append(slice(len(context) - 1, len(context) - 1 + len(c)))
        device = next(iter(self.parameters())).device
        ids = right_padded([row[:-1] for row in rows], device)[0]
        targets = torch.full(ids.shape, IGNORE_INDEX, dtype=torch.long)
        for b, (row, span) in enumerate(zip(rows, spans)):
            targets[b, span] = torch.tensor(row[span.start + 1 :])
        logprobs, greedy = self.score(ids, targets.to(device))
        logprobs, greedy = logprobs.float().cpu(), greedy.cpu()
        return per_group([(float(logprobs[b, s].sum()), bool(greedy[b, s].all())) for b, s in enumerate(spans)], groups)

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, lengths: Optional[torch.Tensor] = None,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop=None,
                 generators: Optional[Sequence[Optional[torch.Generator]]] = None) -> list[list[int]]:
        """New tokens of each row (rows right-padded when `lengths` is given), each row stopping
        on its own; greedy at temperature <= 0, else temperature, top-k, then top-p sampling from
        the exact distribution; `generators`: one per row, so a row's samples do not depend on its
        batch mates. Uses the KV cache when the model declares one (hmst_bench.generation)."""
        from hmst_bench.generation import Sampling, generate_rows, prompts_of

        return generate_rows(self, prompts_of(input_ids, lengths), max_new_tokens,
                             Sampling(temperature, top_p, top_k), stop, generators)

    def decode_step(self, new_tokens: torch.Tensor, state: Any, pad: Optional[torch.Tensor] = None,
                    ) -> tuple[torch.Tensor, Any]:
        """Cached decoding, for a model that declares `kv_cache`: with state None, `new_tokens`
        [B, T] are the prompts left-padded, row b's first pad[b] positions padding (masked, and
        not counted as positions; None, or all zeros, for a model that declares
        `kv_cache_pads = False`); afterwards [B, 1], one token per row. Returns the [B, V]
        next-token log-probs after each row's last token and the new state, exactly equal to
        `next_token_logprobs` of the row's real tokens. Only called while every row fits
        `context_len`."""
        raise NotImplementedError(f"{type(self).__name__} declares kv_cache but does not implement decode_step")

    # ------------------------------------------------------------------ accounting

    def num_active_params(self) -> int:
        """Parameters one token uses (MoE: fewer than all); each shared tensor counted once."""
        return sum(p.numel() for p in self.parameters())

    def extra_flops(self, batch: Mapping[str, torch.Tensor]) -> float:
        """Forward+backward FLOPs of a training step's ops FlopCounterMode cannot see (a
        hand-written scan, a FAISS search), added to every measurement; name such ops in
        `extra_flops_covers`."""
        return 0.0

    def flop_shares(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """How a training step's FLOPs split between the model's parts ({"backbone": 0.8,
        "head": 0.2}), measured on one batch and recorded in run.json; {} records nothing."""
        return {}

    # ------------------------------------------------------------------ state beyond the weights

    def prepare(self, train_tokens) -> None:
        """Called once before a fresh run trains, with the packed training split (1-D ints), for
        state derived from the data (a Huffman tree), which the artifacts methods then keep."""

    def save_artifacts(self, folder) -> None:
        """Write state that is not in the weights (a FAISS store, a tree) into `folder`; called
        inside every checkpoint (atomically, with that step's weights) and for the final run."""

    def load_artifacts(self, folder) -> None:
        """Read back what `save_artifacts` wrote into `folder`."""

    def export(self, run_dir) -> None:
        """Extra copies in other tools' formats (dense baselines: RUN/hf/); never read back."""

    def take_decoding_stats(self) -> dict:
        """What the model's own decoding policy did since the last call (HMST's meta-controller:
        gate rates, FLOPs per generated token), then forget it; the evaluator records it per
        suite as `provenance.decoding`. {} for a model without such a policy."""
        return {}

    def hallucination_scores(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        """With `hallucination_detector`: one finite score per (prompt, answer), higher = more
        likely wrong (HMST's critic); `eval --suite factqa` reports its AUROC."""
        raise NotImplementedError(f"{type(self).__name__} has no hallucination detector")


def per_group(flat: list, groups: Sequence[tuple[Any, Sequence]]) -> list[list]:
    """`score_continuations`'s answer from one flat list of answers, in the groups' order."""
    out, at = [], 0
    for _, continuations in groups:
        out.append(flat[at : at + len(continuations)])
        at += len(continuations)
    return out


class ContractError(TypeError):
    """A plugin's model does not meet the contract; the message is one line naming the fix."""


def check_built(spec: Any, model: Any) -> None:
    """Refuse, in one line, what a plugin's `build` returned unless it is a `LanguageModel` with
    an int `max_seq_len`; a model written for the version-1 Protocol is told what to change."""
    who = f"{spec.name} ({spec.distribution or 'plugin'})"
    if not isinstance(model, LanguageModel):
        if callable(getattr(model, "loss", None)) and callable(getattr(model, "token_logprobs", None)):
            raise ContractError(
                f"{who} builds a {type(model).__name__} written for model contract v1: subclass "
                f"hmst_bench.LanguageModel (contract v{CONTRACT_VERSION}), give next_token_logprobs a "
                "lengths=None argument and drop your own generate (see docs/plugin-guide.md)")
        raise ContractError(f"{who} builds a {type(model).__name__}, not a hmst_bench.LanguageModel subclass "
                            "(see docs/plugin-guide.md)")
    if not isinstance(getattr(model, "max_seq_len", None), int):
        raise ContractError(f"{who} builds a model without an int max_seq_len (its window); set it in __init__")
