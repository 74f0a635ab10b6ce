"""The conformance suite of the model contract (`hmst_bench.LanguageModel`): `hmst-bench check ARCH`.

Any plugin author runs it on their own architecture, and `tests/test_contract.py` runs it over
every registered architecture (each stage's config too), so the properties every model must have
are tested once, here, not copied per architecture. Each property is measured as its largest
difference and reported as one line. The model is checked in float64 by default, where a
difference is a bug and not rounding, so tolerances are tight and greedy choices never flip on a
near-tie; its window is cut to `seq_len` (32 by default) to keep the check quick.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from hmst_bench.arch import IGNORE_INDEX
from hmst_bench.generation import left_padded, right_padded

# log-probs come back as float32 (the contract), so even a float64 model agrees to ~1e-7 only
TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4}


@dataclass
class Finding:
    """One property: whether it holds and its largest difference (or what broke)."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


@dataclass
class Subject:
    """What the checks need: a way to build the model afresh and a few token ids."""

    build: Callable[[], Any]
    vocab: int
    dtype: torch.dtype
    seed: int = 0

    def tokens(self, *shape: int, offset: int = 0) -> torch.Tensor:
        return torch.randint(0, self.vocab, shape, generator=torch.Generator().manual_seed(self.seed + offset))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (a.sign() == b.sign())
    return float((a - b).abs().masked_fill(both_inf, 0.0).max()) if a.numel() else 0.0


def _greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        nxt = int(model.next_token_logprobs(torch.tensor([seq]))[0].argmax())
        out.append(nxt)
        seq.append(nxt)
    return out


# ----------------------------------------------------------------------------- the properties


def _span(model) -> int:
    """How long a query the checks use: the window, or up to two windows for a model that
    reads past it through a memory (so the memory is written and read)."""
    return min(model.context_len, 2 * model.max_seq_len)


def check_scoring(model, s: Subject, tol: float) -> list[Finding]:
    from hmst_bench.model import LanguageModel

    w = _span(model)
    ids = s.tokens(3, w)
    targets = torch.cat([ids[:, 1:], s.tokens(3, 1, offset=1)], dim=1)
    lp = model.token_logprobs(ids, targets)
    cols = sorted({0, w // 2, w - 1})
    nexts = {t: model.next_token_logprobs(ids[:, : t + 1]) for t in cols}
    norm = max(float(n.double().exp().sum(-1).sub(1).abs().max()) for n in nexts.values())
    agree = max(_diff(lp[:, t], nexts[t].gather(-1, targets[:, t : t + 1])[:, 0]) for t in cols)
    changed = ids.clone()
    j = w // 2
    changed[:, j] = (ids[:, j] + 1) % s.vocab
    causal = _diff(model.token_logprobs(changed, targets)[:, :j], lp[:, :j])
    lengths = torch.tensor([w, max(w // 2, 1), 1])
    ragged = model.next_token_logprobs(ids, lengths=lengths)
    alone = torch.cat([model.next_token_logprobs(ids[b : b + 1, : int(n)]) for b, n in enumerate(lengths)])
    masked = targets.clone()
    masked[0, cols[-1]], masked[1, 0] = IGNORE_INDEX, IGNORE_INDEX
    slp, greedy = model.score(ids, masked)
    live = masked != IGNORE_INDEX
    want_greedy = torch.stack([nexts[t].argmax(-1) == masked[:, t] for t in cols], dim=1) | ~live[:, cols]
    context, conts = ids[0, : w - 4].tolist(), [ids[1, :1].tolist(), ids[1, 1:4].tolist(), ids[2, :2].tolist()]
    groups = [(context, conts), (ids[2, : w - 6].tolist(), conts[:2]), (ids[1, :3].tolist(), conts[1:])]
    shared = [a for g in model.score_continuations(groups) for a in g]
    plain = [a for g in LanguageModel.score_continuations(model, groups) for a in g]  # the default
    shared_diff = max(abs(a[0] - b[0]) for a, b in zip(shared, plain))
    return [
        Finding("score_continuations = score", shared_diff <= tol and [a[1] for a in shared] == [b[1] for b in plain],
                f"three contexts, seven continuations: largest difference {shared_diff:.2g}"),
        Finding("normalised", norm <= tol, f"|sum p - 1| <= {norm:.2g} over the next-token distributions"),
        Finding("next_token_logprobs = token_logprobs", agree <= tol, f"largest difference {agree:.2g}"),
        Finding("causality", causal <= tol, f"changing token {j} moved earlier log-probs by {causal:.2g}"),
        Finding("ragged next_token_logprobs", _diff(ragged, alone) <= tol,
                f"rows right-padded vs alone: largest difference {_diff(ragged, alone):.2g}"),
        Finding("score = token_logprobs", _diff(slp.masked_fill(~live, 0), lp.masked_fill(~live, 0)) <= tol
                and bool((slp[~live] == 0).all()), f"largest difference {_diff(slp.masked_fill(~live, 0), lp.masked_fill(~live, 0)):.2g}; ignored positions 0"),
        Finding("score is_argmax", bool((greedy[:, cols] == want_greedy).all()) and bool(greedy[~live].all()),
                f"{int((greedy[:, cols] != want_greedy).sum())} of {want_greedy.numel()} flags differ from the argmax"),
    ]


def check_generation(model, s: Subject, tol: float) -> list[Finding]:
    w, n = _span(model), 6
    prompts = [s.tokens(k, offset=10 + k).tolist() for k in (w - 3, 5, 1)]  # the first crosses the window
    reference = [_greedy_reference(model, p, n) for p in prompts]
    alone = [model.generate(torch.tensor([p]), n)[0] for p in prompts]
    ids, lengths = right_padded(prompts, "cpu")
    batched = model.generate(ids, n, lengths=lengths)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(len(prompts))]  # noqa: E731
    sampled = model.generate(ids, n, lengths=lengths, temperature=1.0, top_k=20, generators=gens())
    sampled_alone = [model.generate(torch.tensor([p]), n, temperature=1.0, top_k=20, generators=[g])[0]
                     for p, g in zip(prompts, gens())]
    out = [
        Finding("greedy generate = argmax", alone == reference,
                "equal step by step" if alone == reference else f"rows differ: {alone} vs {reference}"),
        Finding("batched = unbatched (greedy)", batched == alone, "equal" if batched == alone else f"{batched} vs {alone}"),
        Finding("batched = unbatched (sampled, per-row generators)", sampled == sampled_alone,
                "equal" if sampled == sampled_alone else f"{sampled} vs {sampled_alone}"),
    ]
    if model.kv_cache:
        out.append(check_kv_cache(model, s, tol))
    return out


def check_kv_cache(model, s: Subject, tol: float) -> Finding:
    if model.kv_cache_pads:
        lengths = (7, 2, 4)
    else:  # equal lengths, unpadded; reaching past the window where the model reads further
        lengths = (min(model.max_seq_len - 2, model.context_len - 5),) * 3
    prompts = [s.tokens(k, offset=20 + b).tolist() for b, k in enumerate(lengths)]
    feed = s.tokens(3, 4, offset=30)
    ids, pad = left_padded(prompts, "cpu")
    logprobs, state = model.decode_step(ids, None, pad=pad if model.kv_cache_pads else None)
    worst = 0.0
    for step in range(feed.shape[1] + 1):
        seqs = [p + feed[b, :step].tolist() for b, p in enumerate(prompts)]
        worst = max(worst, _diff(logprobs, model.next_token_logprobs(*right_padded(seqs, "cpu"))))
        if step < feed.shape[1]:
            logprobs, state = model.decode_step(feed[:, step : step + 1], state)
    how = "left-padded prefill" if model.kv_cache_pads else f"prefill of {lengths[0]} tokens"
    return Finding("KV-cache decoding = recomputation", worst <= tol, f"{how} and 4 steps: largest difference {worst:.2g}")


def check_round_trip(model, s: Subject) -> Finding:
    from hmst_bench.train.rundir import load_weights, save_model_file

    ids = s.tokens(2, _span(model), offset=40)
    targets = s.tokens(2, _span(model), offset=41)
    with tempfile.TemporaryDirectory() as tmp:
        save_model_file(model, Path(tmp) / "model.safetensors")
        model.save_artifacts(Path(tmp))
        torch.manual_seed(s.seed + 1)  # a different initialisation, which loading must replace
        fresh = s.build().to(s.dtype).eval()
        load_weights(fresh, Path(tmp) / "model.safetensors")
        fresh.load_artifacts(Path(tmp))
    diff = _diff(fresh.token_logprobs(ids, targets), model.token_logprobs(ids, targets))
    return Finding("save/load round trip", diff == 0.0, f"log-probs after reloading differ by {diff:.2g} (must be 0)")


def check_training(model, s: Subject) -> list[Finding]:
    from hmst_bench.budget import count_flops

    ids = s.tokens(2, _span(model) + 1, offset=50)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    model = copy.deepcopy(model).train()

    def step():
        loss = model.loss(batch)[0]
        loss.backward()
        return loss

    flops = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        flops.append(count_flops(step)[1] + model.extra_flops(batch))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.zero_grad(set_to_none=True)
    before = step().item()
    opt.step()
    with torch.no_grad():
        after = float(model.loss(batch)[0])
    return [
        Finding("FLOPs measured", flops[0] > 0 and flops[0] == flops[1],
                f"{flops[0]:.3g} and {flops[1]:.3g} FLOPs for the same batch (positive, equal)"),
        Finding("one step lowers the loss", after < before, f"loss {before:.6f} -> {after:.6f} on a repeated batch"),
    ]


def run_checks(subject: Subject) -> list[Finding]:
    """Every property on a freshly built model; a property that raises is a failure naming the error."""
    from hmst_bench.model import LanguageModel

    torch.manual_seed(subject.seed)
    model = subject.build()
    if not isinstance(model, LanguageModel):
        return [Finding("LanguageModel subclass", False, f"build returned a {type(model).__name__}")]
    model = model.to(subject.dtype)
    model.prepare(subject.tokens(4096, offset=60).numpy())
    model.eval()
    tol = TOLERANCE[subject.dtype]
    findings: list[Finding] = []
    groups = [("scoring", lambda: check_scoring(model, subject, tol)),
              ("generation", lambda: check_generation(model, subject, tol)),
              ("save/load round trip", lambda: [check_round_trip(model, subject)]),
              ("training", lambda: check_training(model, subject))]
    for name, group in groups:
        try:
            with torch.no_grad() if name != "training" else torch.enable_grad():
                findings += group()
        except Exception as exc:  # noqa: BLE001 - a broken method is a finding, not a crash of the suite
            findings.append(Finding(name, False, f"raised {type(exc).__name__}: {exc}"))
    return findings


def arch_subject(spec, size: str = "micro", sets: Optional[dict] = None, stage: Optional[str] = None,
                 seq_len: int = 32, dtype: torch.dtype = torch.float64) -> Subject:
    """The architecture at `size` (with a stage's config and `--set` values, as `train` applies
    them), its window cut to `seq_len`, with a small tokenizer trained on the embedded corpus."""
    from hmst_bench.data.corpora import load_corpus
    from hmst_bench.data.tokenizer import train_tokenizer

    values = dict(spec.stage_config(stage)) if stage and spec.stage_config else {}
    values.update(sets or {})
    config = spec.make_config(size, values)
    corpus = load_corpus("synthetic-facts")
    tok = train_tokenizer(corpus.split["train"], min(config.vocab_size, 512), cache_key=corpus.fingerprint)
    if spec.check_sets is not None:  # what the architecture needs beyond its defaults; the user's values win
        config = spec.make_config(size, {**dict(spec.check_sets(tok)), **values})
    config = dataclasses.replace(config, vocab_size=len(tok), max_seq_len=seq_len)
    return Subject(build=lambda: spec.build(config, tok), vocab=len(tok), dtype=dtype)
