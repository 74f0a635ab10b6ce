"""The lm-evaluation-harness model adapter: any hmst-bench run directory as an lm-eval `LM`.

Registered in lm-eval's model registry as `hmst-bench`, so both our `hmst-bench eval` and
lm-eval's own CLI (`hmst-bench lm-eval --model hmst-bench --model_args run=DIR ...`) use it.
Tokenisation, the empty-context prefix, context/continuation splitting, rolling windows and
stop-sequence handling are lm-eval's own (`TemplateLM` and `lm_eval.models.utils`), so a
dense baseline scores exactly as lm-eval's `HFLM` scores its `RUN/hf` copy. The model is only
reached through the model contract (`hmst_bench.LanguageModel`, v2):

- context: the last `max_length` tokens (the model's window), or, for a model that reads
  further through a memory and says so with `max_context_len` (HMST), the last that many; a
  continuation longer than that is itself cut to its last tokens (`window_cuts` counts both);
- loglikelihood: requests are deduplicated; a one-token continuation is read off
  `next_token_logprobs` of its context, so all the choices that share a context (A/B/C/D in
  MMLU) cost one row together, and contexts are batched (right-padded, with `lengths`); longer
  continuations go to the model's `score_continuations`: in batches sorted by length to keep
  padding small (the default answers each batch with one `score` call), or, for a model that
  reads past its window (`max_context_len`), grouped by context, so each context is read once;
- loglikelihood_rolling: lm-eval's disjoint rolling windows of the model's context length;
- generate_until: requests with equal generation arguments in batches through the model's
  batched `generate` (KV cache where it has one), with lm-eval's stop strings checked on each
  row's decoded text as tokens arrive, greedy or sampled (each row from its own seeded
  generator); the prompt is cut from the left to leave room for `max_gen_toks` (see
  `_prompt_room` for short windows).

Each answer is handed to lm-eval's cache hook as soon as it exists, so with `use_cache` an
interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import warnings
from collections import Counter
from typing import Any, Iterable, Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from hmst_bench.generation import right_padded

DEFAULT_BATCH_SIZE = 32
DEFAULT_SEED = 1234  # of each sampled row's own generator (see _row_generators)
DEFAULT_MAX_GEN_TOKS = 256
# under lm_eval's logger, so `hmst-bench eval` (which quiets lm_eval to ERROR and reports the
# counts itself) stays quiet, while lm-eval's own CLI shows it as it shows HFLM's truncation warning
log = logging.getLogger("lm_eval.models.hmst_bench")


@contextlib.contextmanager
def quiet_git_probe():
    """lm-eval records the git commit of the current folder (`results["git_hash"]`) by running
    `git describe --always` with git's stderr left on the console, so every evaluation started
    outside a git checkout printed "fatal: not a git repository". While the block runs, lm-eval's
    evaluator calls `_git_describe_quietly` instead: the same command and fallback, git's stderr
    discarded. lm-eval's files are untouched; an lm-eval without that function is left as it is."""
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:
        yield
        return
    evaluator.get_git_commit_hash = _git_describe_quietly
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def _git_describe_quietly() -> Optional[str]:
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        proc = subprocess.run(["git", "describe", "--always"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, check=True, timeout=10)
        return proc.stdout.decode().strip()
    except (OSError, subprocess.SubprocessError):
        return get_commit_from_path(os.getcwd())


def _batch_size(value: Any) -> int:
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    return size


@register_model("hmst-bench")
class HmstBenchLM(TemplateLM):
    """lm-eval model over a run directory (`run=DIR`) or an already loaded `hmst_bench.Run`."""

    def __init__(
        self,
        run: Any = None,
        device: Optional[str] = None,
        batch_size: Any = None,
        max_length: Optional[int] = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        progress: bool = True,
        seed: int = DEFAULT_SEED,
        **unused: Any,
    ) -> None:
        super().__init__()
        from hmst_bench.train.rundir import Run, load_run

        if run is None:
            raise ValueError("the hmst-bench model needs a run directory: --model_args run=DIR")
        if device in (None, "", "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI asks for cuda by default; like HFLM, run where we can
            warnings.warn(f"device {device!r} is not available here; evaluating on the CPU")
            device = "cpu"
        self.run = run if isinstance(run, Run) else load_run(run)
        self.model = self.run.model.to(device).eval()
        self.tokenizer = self.run.tokenizer
        self._device = torch.device(device)
        self.batch_size = _batch_size(batch_size)
        window = int(self.model.max_seq_len)
        self.max_length = min(int(max_length), window) if max_length else window
        # a model with a memory (HMST) reads further back than its window: it gets the whole
        # context up to its `max_context_len`; every other model gets the last window
        reach = int(self.model.max_context_len or window)
        self.max_context = min(int(max_length), reach) if max_length else reach
        self.max_gen_toks = int(max_gen_toks)
        self.progress = progress  # False: no tqdm bars (our CLI shows its own status)
        self.seed = int(seed)
        # requests this process actually computed (the rest came from lm-eval's cache)
        self.computed = {"loglikelihood": 0, "loglikelihood_rolling": 0, "generate_until": 0}
        # (context, continuation) -> how the window cut it ("context", "continuation" or None),
        # for the loglikelihood requests scored here: window_cuts then tokenises only the rest
        self._cut: dict[tuple[str, str], Optional[str]] = {}

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # as HFLM: BOS when the tokenizer has one, else end-of-text
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context_ids, continuation_ids)."""
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        # what the model reads and which of the last positions are scored, as in HFLM: the
        # whole sequence is cut to the window from the left, the final token is never input
        jobs: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
        empty, cut = [], 0
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:  # nothing to score: HFLM's empty sum, 0.0, and vacuously greedy
                empty.append(i)
                continue
            # a continuation longer than the context the model reads is scored on its last
            # `max_context` tokens (the only ones with a preceding token in the window), as
            # what fits; `window_cuts` counts these for the result file
            cut += len(continuation) > self.max_context
            if requests[i][0] is not None:
                self._cut[tuple(requests[i][0])] = ("continuation" if len(continuation) > self.max_context else
                                                    "context" if len(context) + len(continuation) > self.max_context + 1
                                                    else None)
            scored = min(len(continuation), self.max_context)
            whole = (list(context) + list(continuation))[-(self.max_context + 1) :]
            key = (tuple(whole[:-1]), tuple(whole[-scored:]))
            jobs.setdefault(key, []).append(i)
        if cut:
            log.warning("%d continuations are longer than the %d-token window; each is scored on its last %d tokens",
                        cut, self.max_context, self.max_context)

        single = [k for k in jobs if len(k[1]) == 1]
        multi = [k for k in jobs if len(k[1]) > 1]
        progress = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)

        def answered(indices, answer):
            for i in indices:
                results[i] = answer
                if requests[i][0] is not None:  # None: a rolling window, cached as a whole text
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                    self.computed["loglikelihood"] += 1
            progress.update(len(indices))

        def finish(key, answer):
            answered(jobs[key], answer)

        answered(empty, (0.0, True))

        # one-token continuations: one next-token distribution per distinct context
        contexts: dict[tuple[int, ...], list] = {}
        for key in single:
            contexts.setdefault(key[0], []).append(key)
        ordered = sorted(contexts, key=len, reverse=True)
        for start in range(0, len(ordered), self.batch_size):
            chunk = ordered[start : start + self.batch_size]
            for ctx, dist in zip(chunk, self._next_token_logprobs(chunk)):
                best = int(dist.argmax())
                for key in contexts[ctx]:
                    token = key[1][0]
                    finish(key, (float(dist[token]), best == token))

        # longer continuations of a model that reads past its window: each context read once
        if self.model.max_context_len is not None:
            self._score_shared_prefix(multi, finish)
            multi = []
        # longer continuations: right-padded batches, scored at the continuation only
        multi.sort(key=lambda k: len(k[0]), reverse=True)
        for start in range(0, len(multi), self.batch_size):
            chunk = multi[start : start + self.batch_size]
            for key, answer in zip(chunk, self._score_continuations(chunk)):
                finish(key, answer)
        progress.close()
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _score_shared_prefix(self, keys, finish) -> None:
        """Multi-token continuations grouped by the context before them, up to `batch_size`
        contexts (and 8 x `batch_size` continuations) per `score_continuations` call, which a
        memory model answers with one read of each context, contexts of equal length side by
        side (longest first, so they meet in one call)."""
        groups: dict[tuple[int, ...], list] = {}
        for key in keys:
            inp, cont = key
            groups.setdefault(inp[: len(inp) - len(cont) + 1], []).append(key)
        ordered = sorted(groups, key=len, reverse=True)
        while ordered:
            chunk, rows = [], 0
            while ordered and (not chunk or (len(chunk) < self.batch_size
                                             and rows + len(groups[ordered[0]]) <= 8 * self.batch_size)):
                chunk.append(ordered.pop(0))
                rows += len(groups[chunk[-1]])
            answers = self.model.score_continuations([(list(c), [list(k[1]) for k in groups[c]]) for c in chunk])
            for context, scored in zip(chunk, answers):
                for key, answer in zip(groups[context], scored):
                    finish(key, answer)

    @torch.no_grad()
    def _next_token_logprobs(self, contexts: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """Next-token log-distributions after each context, in one right-padded batch."""
        ids, lengths = right_padded(contexts, self.device)
        return list(self.model.next_token_logprobs(ids, lengths=lengths).float().cpu())

    @torch.no_grad()
    def _score_continuations(self, keys) -> list[tuple[float, bool]]:
        """One batch of (input, continuation) keys, each its own group of `score_continuations`
        (the base class's: one right-padded `score` call over all of them)."""
        groups = [(inp[: len(inp) - len(cont) + 1], [cont]) for inp, cont in keys]
        return [answers[0] for answers in self.model.score_continuations(groups)]

    def window_cuts(self, requests: Iterable[tuple[str, Any]]) -> dict[str, int]:
        """How many of these requests (their `args`) the context the model reads cut short:
        loglikelihood pairs whose context lost tokens on the left (`context`, as HFLM cuts) or
        whose continuation alone was longer and was scored on its last tokens only
        (`continuation`), and generation prompts cut from the left to leave room for the answer
        (`prompt`). Requests scored by this adapter are looked up; the others (answers from the
        cache) are tokenised as lm-eval's `loglikelihood` does, batched here."""
        cuts = {"context": 0, "continuation": 0, "prompt": 0}
        pairs: Counter = Counter()
        for args in requests:
            context, second = args
            if isinstance(second, str) and (context, second) in self._cut:
                kind = self._cut[(context, second)]
                if kind:
                    cuts[kind] += 1
            elif isinstance(second, str):
                pairs[(context, second)] += 1
            else:
                kwargs = normalize_gen_kwargs(dict(second), self.max_gen_toks)
                room = self._prompt_room(int(kwargs["max_gen_toks"]))
                cuts["prompt"] += len(self.tok_encode(context)) > room
        # lm-eval's split (TemplateLM.loglikelihood and _encode_pair): trailing spaces of the
        # context move to the continuation; the continuation's tokens are those of the whole
        # text after the context's; an empty context is the prefix token
        texts: dict[str, int] = {}
        split = []
        for context, continuation in pairs:
            if context == "":
                split.append((None, continuation))
            else:
                spaces = len(context) - len(context.rstrip())
                if spaces:
                    context, continuation = context[:-spaces], context[-spaces:] + continuation
                split.append((context, context + continuation))
            for text in split[-1]:
                if text is not None:
                    texts.setdefault(text, len(texts))
        lengths = [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []
        for (context, whole), count in zip(split, pairs.values()):
            if context is None:  # the prefix token as context, unless the continuation starts with it
                starts = lengths[texts[whole]] and self.tok_encode(whole)[0] == self.prefix_token_id
                ctx_len, cont_len = 1, lengths[texts[whole]] - bool(starts)
            else:
                ctx_len = lengths[texts[context]]
                cont_len = lengths[texts[whole]] - ctx_len
            if cont_len > self.max_context:
                cuts["continuation"] += count
            elif ctx_len + cont_len > self.max_context + 1:
                cuts["context"] += count
        return cuts

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1),
            ):
                windows.append((None, context, continuation))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm or not self.progress)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owners, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            self.computed["loglikelihood_rolling"] += 1
        return totals

    # ------------------------------------------------------------------ generation

    def _prompt_room(self, max_gen_toks: int) -> int:
        """How many prompt tokens to keep (from the right): HFLM's `max_length - max_gen_toks`.
        Where HFLM refuses (`max_gen_toks` fills the window), keep the last half window of
        prompt and generate on past the window, which every model's `generate` does exactly."""
        room = self.max_context - max_gen_toks
        return room if room > 0 else self.max_context // 2

    def stop_when(self, until: list[str]):
        """A `generate` stop callable: fires (keeping every token) once the decoded new text
        contains a stop string; the text is cut at the string afterwards."""

        def check(tokens: list[int]):
            text = self.tok_decode(tokens, skip_special_tokens=False)
            return any(s and s in text for s in until)

        return check

    def _sampling(self, gen_kwargs: dict) -> tuple[dict, list[str], int]:
        """lm-eval's generation arguments as (our sampling arguments, stop strings, max_gen_toks)."""
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id], skip_special_tokens=False))
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        if not kwargs.get("do_sample"):
            return {"temperature": 0.0, "top_p": 1.0, "top_k": 0}, until, max_gen_toks
        return {"temperature": float(kwargs.get("temperature") or 1.0), "top_p": float(kwargs.get("top_p") or 1.0),
                "top_k": int(kwargs.get("top_k") or 0)}, until, max_gen_toks

    def _row_generators(self, args: list[tuple]) -> list[torch.Generator]:
        """One generator per sampled request, seeded from (seed, context, arguments, how many
        identical requests came before it in this call): a row's sample never depends on its
        batch mates or the batch size, and lm-eval's repeats of one request differ."""
        seen: Counter = Counter()
        out = []
        for arg in args:
            text = repr((self.seed, arg[0], sorted(arg[1].items()), seen[repr(arg)]))
            seen[repr(arg)] += 1
            g = torch.Generator(device=self.device)
            g.manual_seed(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1)
            out.append(g)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with equal generation arguments are decoded together in batches of
        `batch_size`, longest prompt first; each answer is cached as its batch completes."""
        args = [req.args for req in requests]
        generators = self._row_generators(args)
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(repr(sorted(dict(gen_kwargs).items())), []).append(i)
        out: list[Optional[str]] = [None] * len(args)
        progress = tqdm(total=len(args), desc="generate_until", disable=disable_tqdm or not self.progress)
        for members in groups.values():
            sampling, until, max_gen_toks = self._sampling(args[members[0]][1])
            room = self._prompt_room(max_gen_toks)
            prompts = {i: self.tok_encode(args[i][0])[-room:] or [self.prefix_token_id] for i in members}
            members.sort(key=lambda i: len(prompts[i]), reverse=True)
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                ids, lengths = right_padded([prompts[i] for i in batch], self.device)
                rows = self.model.generate(ids, max_gen_toks, lengths=lengths, stop=[self.eot_token_id, self.stop_when(until)],
                                           generators=[generators[i] for i in batch] if sampling["temperature"] > 0 else None,
                                           **sampling)
                for i, tokens in zip(batch, rows):
                    out[i] = postprocess_generated_text(generation=self.tok_decode(tokens), stop=until, think_end_token=None)
                    self.cache_hook.add_partial("generate_until", args[i], out[i])
                    self.computed["generate_until"] += 1
                progress.update(len(batch))
        progress.close()
        return out  # type: ignore[return-value]
