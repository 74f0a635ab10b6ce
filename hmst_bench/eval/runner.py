"""`hmst-bench eval`: run registered suites on a run directory through lm-eval and record them.

For each suite: check that its benchmark data is in the store, build an lm-eval `TaskManager`
over the suite configs (lm-eval's built-in task index is not scanned: our configs read the
store and never the hub), and call `lm_eval.simple_evaluate` with the `hmst-bench` model
(`hmst_bench.eval.lm`) wrapped in lm-eval's request cache. The cache lives in
`RUN/eval/cache/` and is keyed by the sha256 of everything the model is loaded from (plus
device, window and default generation length), so an interrupted evaluation resumes and a
repeated one is served from it, while a run trained further starts afresh. Then the modules
the suite names in `SuiteSpec.postprocess` (calibration, hallucination, a plugin's own) compute
their metrics from the suite's per-sample log; each was imported before the model loaded.

`RUN/eval/<suite>.json` is written atomically and holds lm-eval's results, group results,
configs, versions and n-shot, the per-sample log in lm-eval's samples format, and provenance.
Another folder may take the result files and the cache (`out_dir`, the CLI's `--out`). Whether
they can be written is tried before any work: where they cannot (a read-only run), the suites
are evaluated anyway, without the cache, and reported but not saved, never computed and lost.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib
import json
import logging
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

from hmst_bench.eval.suite import SuiteSpec
from hmst_bench.util import atomic_write, unwritable

EVAL_DIR = "eval"
CACHE_DIR = "cache"
# lm-eval's own defaults (random, numpy, torch, few-shot); `--seed N` sets all four to N
DEFAULT_SEEDS = (0, 1234, 1234, 1234)


class EvalError(ValueError):
    """Bad input to `hmst-bench eval`; the message is one line naming the fix."""


class EvalWarning(UserWarning):
    """Something an evaluation could not write (it goes on without it)."""


@dataclass(frozen=True)
class Output:
    """Where an evaluation writes, as tried before any work: result files and figures in `dir`
    when `save`, the request cache in dir/cache when `cache`; `reason` says why not (the OS's
    words), `cache_asked` whether the caller wanted the cache."""

    dir: Path
    save: bool
    cache: bool
    cache_asked: bool
    reason: Optional[str] = None

    @property
    def message(self) -> Optional[str]:
        if not self.save:
            without = "without the request cache; " if self.cache_asked else ""
            return f"{self.dir} is not writable ({self.reason}): evaluating {without}the results are shown but not saved"
        if self.cache_asked and not self.cache:
            return f"{self.dir / CACHE_DIR} is not writable ({self.reason}): evaluating without the request cache"
        return None


def plan_output(run_dir: Path, out_dir: Optional[Path] = None, use_cache: bool = True) -> Output:
    """Try for real whether the results (RUN/eval, or out_dir) and the cache can be written."""
    folder = Path(out_dir) if out_dir is not None else Path(run_dir) / EVAL_DIR
    why = unwritable(folder)
    if why:
        return Output(folder, save=False, cache=False, cache_asked=use_cache, reason=why)
    why = unwritable(folder / CACHE_DIR) if use_cache else None
    return Output(folder, save=True, cache=use_cache and not why, cache_asked=use_cache, reason=why)


def resolve_suites(names: Sequence[str], known: dict[str, SuiteSpec]) -> list[SuiteSpec]:
    unknown = [n for n in names if n not in known]
    if unknown:
        listing = ", ".join(n for n in known if not n.startswith("mmlu_")) or "none"
        raise EvalError(
            f"unknown suite {unknown[0]!r}; known: {listing} (and mmlu_<subject>; `hmst-bench list suites` shows all)"
        )
    if not names:
        raise EvalError("no suite given; use --suite NAME[,NAME...] (`hmst-bench list suites` shows them)")
    return [known[n] for n in dict.fromkeys(names)]


def check_data(suites: Sequence[SuiteSpec]) -> dict[str, dict]:
    """The store manifests of every benchmark the suites read (StoreError names the import)."""
    from hmst_bench.eval import store

    manifests = {}
    for suite in suites:
        for name in suite.data:
            if name not in manifests:
                manifests[name] = store.require(name)
    return manifests


def postprocessors(suite: SuiteSpec) -> dict[str, ModuleType]:
    """The suite's post-processing modules (`SuiteSpec.postprocess`) by result key, imported;
    EvalError, one line, for a module that cannot be imported or has no `postprocess`."""
    loaded = {}
    for key, name in suite.postprocess.items():
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - ImportError, or any error the module raises as it loads
            why = (str(exc).strip().splitlines() or [""])[0]
            raise EvalError(f"suite {suite.name!r}: cannot import its postprocess module {name!r} "
                            f"({type(exc).__name__}: {why}); install the package that provides it") from None
        if not callable(getattr(module, "postprocess", None)):
            raise EvalError(f"suite {suite.name!r}: its postprocess module {name!r} has no function "
                            "postprocess(record, lm, out_dir); add one")
        loaded[key] = module
    return loaded


def _sha256(path: Path, digest=None):
    digest = digest or hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest


# what a run directory holds besides the model itself: records, resume state, exports, results
NOT_MODEL = {"run.json", "metrics.jsonl", "state", "eval", "hf"}


def model_fingerprint(run_dir: Path) -> dict[str, str]:
    """sha256 of the weights, and of everything the model is loaded from (weights, config,
    tokenizer and the architecture's artifacts, e.g. a FAISS store): the cache key."""
    from hmst_bench.train.rundir import weights_path

    weights = weights_path(run_dir)
    files = sorted(p for p in run_dir.rglob("*") if p.is_file()
                   and p.relative_to(run_dir).parts[0] not in NOT_MODEL and not p.name.startswith("."))
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(run_dir)).encode() + b"\0")
        _sha256(path, digest)
    return {"weights_sha256": _sha256(weights).hexdigest(), "model_sha256": digest.hexdigest()}


def task_manager(suites: Sequence[SuiteSpec]):
    """A TaskManager over the suites' config folders only (no scan of lm-eval's ~10k configs)."""
    from lm_eval.tasks import TaskManager

    dirs = sorted({s.task_dir for s in suites if s.task_dir})
    builtin = any(s.task_dir is None for s in suites)
    return TaskManager(include_path=dirs or None, include_defaults=builtin)


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _jsonable(obj: Any) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(obj, default=handle_non_serializable, ensure_ascii=False)


def evaluate(
    run_dir: str | Path,
    suites: Sequence[SuiteSpec],
    limit: Optional[int] = None,
    num_fewshot: Optional[int] = None,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    device: Optional[str] = None,
    use_cache: bool = True,
    on_suite=None,
    progress: bool = True,
    code: Optional[CodeOptions] = None,
    out_dir: Optional[Path] = None,
    notice: Optional[Callable[[Output], None]] = None,
    verify: bool = False,
    verify_threshold: Optional[float] = None,
) -> list[dict]:
    """Evaluate every suite; returns the records written to RUN/eval/<suite>.json (or out_dir).

    on_suite(record, file) is called as each suite ends; file is None when it was not saved.
    notice(output) is called once, before any work, when results or cache cannot be written
    (default: an EvalWarning). A result file that fails to write after all (a full disk) does not
    stop the other suites; EvalError names it once every suite is done and reported.
    verify: factqa withholds answers the model's hallucination detector scores above
    `verify_threshold` (default: the model's own `hallucination_threshold`), recorded in the
    provenance as `verification`."""
    import lm_eval
    import torch

    from hmst_bench.data import facts
    from hmst_bench.eval import hallucination, longctx
    from hmst_bench.eval.lm import HmstBenchLM, quiet_git_probe
    from hmst_bench.train.rundir import git_sha, load_run, read_info

    run_dir = Path(run_dir)
    read_info(run_dir)  # RunError for a directory that is not a run
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be at least 1, got {limit}")
    code = code or CodeOptions()
    code.check(suites)
    manifests = check_data(suites)
    post = {suite.name: postprocessors(suite) for suite in suites}  # before the model loads: a typo fails fast
    fingerprint = model_fingerprint(run_dir)
    run = load_run(run_dir)
    if model_fingerprint(run_dir) != fingerprint:  # a training job checkpointed meanwhile
        raise EvalError(f"{run_dir} changed while it was loading (is it still training?); evaluate it again")
    # tried after the run proved loadable (the try makes RUN/eval), before any request is answered
    output = plan_output(run_dir, out_dir, use_cache)
    if output.message:
        if notice is not None:
            notice(output)
        else:
            warnings.warn(output.message, EvalWarning, stacklevel=2)
    verification = _verification(run.model, verify, verify_threshold)
    seeds = DEFAULT_SEEDS if seed is None else (seed,) * 4
    corpus = run.info.get("corpus_spec")
    facts_size = facts.FactsSpec.parse(corpus) if facts.is_facts(corpus) else facts.FactsSpec()
    # sampled rows draw from generators seeded from lm-eval's torch seed, so the cache name has it
    lm = HmstBenchLM(run=run, device=device, batch_size=batch_size, progress=progress, seed=seeds[2])
    # lm-eval keys each answer by the request; the file name adds what else decides the answer:
    # the model's files, the code that computes it, device, window and default generation length
    code_hash = hashlib.sha256(repr((_version("hmst-bench"), _version("lm_eval"), run.spec.distribution,
                                _version(run.spec.distribution) if run.spec.distribution else None)).encode())
    cache = output.dir / CACHE_DIR / (
        f"lm-{fingerprint['model_sha256'][:16]}-{code_hash.hexdigest()[:8]}-{lm.device.type}"
        f"-w{lm.max_length}{'' if lm.max_context == lm.max_length else f'-c{lm.max_context}'}-g{lm.max_gen_toks}"
        f"-s{lm.seed}")
    manager = task_manager(suites)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # our table reports; lm-eval's INFO is noise here

    records, unsaved = [], []
    for suite in suites:
        started = time.time()
        before = dict(lm.computed)
        run.model.take_decoding_stats()  # what an earlier suite decoded is not this one's
        tasks, gen_kwargs = code.tasks(suite, manager)
        # longctx builds its documents for this model's window and tokenizer (hmst_bench.eval.longctx);
        # quiet_git_probe: lm-eval's `git describe` of the cwd, without git's "fatal: ..." outside a checkout
        # factqa asks about the knowledge base the run was trained on (a sized synthetic-facts)
        with code.execution(suite), longctx.context(lm.max_length, lm.tokenizer), \
                hallucination.knowledge(facts_size), quiet_git_probe():
            out = _simple_evaluate(lm_eval, lm, tasks, gen_kwargs, num_fewshot, limit, cache, output.cache, manager,
                                   seeds, unsafe=suite.executes_code)
            sandbox = code.attach_outcomes(suite, out)
        computed = {k: lm.computed[k] - before[k] for k in lm.computed}
        decoding = run.model.take_decoding_stats()  # the model's decoding policy in this suite (HMST's controller)
        # one sample per document and filter; every filter sees the same responses. A response is
        # a list per request: one answer, or `repeats` sampled generations
        per_doc = {(task, s["doc_id"]): sum(len(r) if isinstance(r, list) else 1 for r in s["resps"])
                   for task, rows in out["samples"].items() for s in rows}
        requests = sum(per_doc.values())
        # requests the model's window cut short (HFLM's left truncation, and continuations or
        # prompts longer than fits), counted from the logged requests so cached answers count too
        firsts = {(task, s["doc_id"]): s for task, rows in out["samples"].items() for s in reversed(rows)}
        truncated = lm.window_cuts(tuple(a) for s in firsts.values() for a in s.get("arguments") or ()
                                   if isinstance(a, (list, tuple)) and len(a) == 2 and isinstance(a[0], str))
        record = {
            "suite": suite.name,
            "tasks": list(suite.tasks),
            "results": out["results"],
            "groups": out.get("groups", {}),
            "group_subtasks": out.get("group_subtasks", {}),
            "configs": out["configs"],
            "versions": out["versions"],
            "n-shot": out["n-shot"],
            "higher_is_better": out["higher_is_better"],
            "n-samples": out["n-samples"],
            "samples": out["samples"],
            "provenance": {
                "run": str(run_dir.resolve()),
                "arch": run.info.get("arch"),
                "config_hash": run.info.get("config_hash"),
                **fingerprint,
                "run_status": run.info.get("status"),
                "steps": run.info.get("steps"),
                "stage": run.info.get("stage"),
                "data": {n: {"sha256": m.get("sha256"), "source": m.get("source")} for n, m in manifests.items()
                         if n in suite.data},
                "task_versions": out["versions"],
                "versions": {
                    "hmst-bench": _version("hmst-bench"),
                    "lm-eval": _version("lm_eval"),
                    "torch": torch.__version__,
                    "transformers": _version("transformers"),
                },
                "git_sha": git_sha(),
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "limit": limit,
                "num_fewshot": num_fewshot,
                "seeds": dict(zip(("random", "numpy", "torch", "fewshot"), seeds)),
                "batch_size": lm.batch_size,
                "device": str(lm.device),
                "facts_corpus": facts_size.text,  # the knowledge base factqa asks about
                "verification": verification,
                "window": lm.max_length,  # the model's attention window
                "context": lm.max_context,  # tokens of context it reads (more than the window through a memory)
                "requests": {"total": requests, "computed": sum(computed.values()),
                             "from_cache": max(requests - sum(computed.values()), 0), "truncated": truncated},
                "seconds": round(time.time() - started, 2),
                **({"code_execution": sandbox} if sandbox else {}),
                **({"decoding": decoding} if decoding else {}),
            },
        }
        for key, module in post[suite.name].items():
            extra = module.postprocess(record, lm, output.dir if output.save else None)
            if extra:
                record[key] = extra
        file = output.dir / f"{suite.name}.json" if output.save else None
        if file is not None:
            try:
                atomic_write(file, _jsonable(record))
            except OSError as exc:  # writable when checked, not now (a full disk): report, go on, say so at the end
                unsaved.append(f"{file} ({exc.strerror or exc})")
                file = None
        records.append(record)
        if on_suite is not None:
            on_suite(record, file)
    if unsaved:
        raise EvalError(f"could not write {unsaved[0]}" + (f" and {len(unsaved) - 1} more" if len(unsaved) > 1 else "")
                        + "; every suite was evaluated and reported, but these results are not saved: "
                        "free space, or evaluate again with --out DIR")
    return records


def _verification(model: Any, verify: bool, threshold: Optional[float]) -> Optional[dict]:
    """The `verification` provenance entry: None when off, else the threshold and where it came
    from; a model without a hallucination detector keeps every answer (threshold None), so that
    an experiment can compare its rates with a verified model's."""
    if not verify:
        if threshold is not None:
            raise EvalError("a verification threshold needs verification on (--verify)")
        return None
    if not model.hallucination_detector:  # nothing to verify with: every answer is kept (comparable rows)
        return {"threshold": None, "chosen_on": "no hallucination detector: every answer kept"}
    if threshold is not None:
        if not 0 <= threshold <= 1:
            raise EvalError(f"the verification threshold must be in [0, 1], got {threshold}")
        return {"threshold": float(threshold), "chosen_on": "--verify-threshold"}
    chosen = model.hallucination_threshold
    if chosen is None:
        raise EvalError("the model's detector has no threshold of its own; pass --verify-threshold T")
    return {"threshold": float(chosen), "chosen_on": "the detector's validation split"}


def _simple_evaluate(lm_eval, lm, tasks, gen_kwargs, num_fewshot, limit, cache, use_cache, manager, seeds, unsafe):
    # unsafe: lm-eval's consent to run a task's generated code; given only for our suites that
    # run it in the sandbox (SuiteSpec.executes_code), never for other configs
    return lm_eval.simple_evaluate(
        confirm_run_unsafe_code=unsafe,
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        use_cache=str(cache) if use_cache else None,
        task_manager=manager,
        log_samples=True,
        random_seed=seeds[0],
        numpy_random_seed=seeds[1],
        torch_random_seed=seeds[2],
        fewshot_random_seed=seeds[3],
        gen_kwargs=gen_kwargs,
        batch_size=lm.batch_size,
        device=str(lm.device),
    )


@dataclass(frozen=True)
class CodeOptions:
    """How the suites that execute generated code (humaneval, mbpp) sample and run it.

    samples: completions per problem (lm-eval `repeats`; default the task's, 1); temperature and
    top_p: sampling (default greedy; with samples > 1 and no temperature, 0.8 and 0.95, the
    Codex paper's pass@100 setting); ks: pass@k reported for k <= samples; max_gen_toks: a cap
    on completion length (default the task's 1024); timeout, workers and allow_unsandboxed: the
    sandbox's."""

    samples: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    ks: Optional[tuple[int, ...]] = None
    max_gen_toks: Optional[int] = None
    timeout: float = 10.0
    workers: int = 0
    allow_unsandboxed: bool = False

    def given(self) -> list[str]:
        names = {"samples": "--samples", "temperature": "--temperature", "top_p": "--top-p", "ks": "--k",
                 "max_gen_toks": "--max-gen-toks"}
        return [flag for key, flag in names.items() if getattr(self, key) is not None]

    def check(self, suites: Sequence[SuiteSpec]) -> None:
        if self.given() and not any(s.executes_code for s in suites):
            raise EvalError(f"{self.given()[0]} applies to suites that run generated code (humaneval, mbpp); "
                            "drop it or add such a suite")
        if self.samples is not None and self.samples < 1:
            raise EvalError(f"--samples must be at least 1, got {self.samples}")
        if self.temperature is not None and self.temperature < 0:
            raise EvalError(f"--temperature must be at least 0, got {self.temperature}")
        if self.max_gen_toks is not None and self.max_gen_toks < 1:
            raise EvalError(f"--max-gen-toks must be at least 1, got {self.max_gen_toks}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise EvalError(f"--top-p must be in (0, 1], got {self.top_p}")
        if any(s.executes_code for s in suites):
            from hmst_bench.eval.sandbox import SandboxError, SandboxPool

            try:  # refuse before any generation, not after
                SandboxPool(1, allow_unsandboxed=self.allow_unsandboxed).close()
            except SandboxError as exc:
                raise EvalError(str(exc)) from None

    def tasks(self, suite: SuiteSpec, manager) -> tuple[list, Optional[dict]]:
        """lm-eval task specs for the suite and generation overrides (names unchanged otherwise)."""
        if not suite.executes_code or not self.given():
            return list(suite.tasks), None
        from lm_eval.tasks import get_task_dict

        task_dict = get_task_dict(list(suite.tasks), manager)
        samples = self.samples or 1
        temperature = self.temperature if self.temperature is not None else (0.8 if samples > 1 else 0.0)
        gen = {"do_sample": temperature > 0, "temperature": temperature}
        if temperature > 0:
            gen["top_p"] = self.top_p if self.top_p is not None else (0.95 if self.temperature is None else 1.0)
        if self.max_gen_toks is not None:
            gen["max_gen_toks"] = self.max_gen_toks
        for task in task_dict.values():
            task.set_config("repeats", samples)
        return list(task_dict.values()), gen

    @contextlib.contextmanager
    def execution(self, suite: SuiteSpec):
        if not suite.executes_code:
            yield
            return
        from hmst_bench.eval import code

        with code.execution(self.ks or code.DEFAULT_K, self.timeout, self.workers, self.allow_unsandboxed):
            yield

    def attach_outcomes(self, suite: SuiteSpec, out: dict) -> Optional[dict]:
        """Each sample's programs' sandbox results into the sample log; the settings for provenance."""
        if not suite.executes_code:
            return None
        from hmst_bench.eval import code

        for rows in out["samples"].values():
            for sample in rows:
                programs = sample.get("filtered_resps") or []
                programs = programs[0] if programs and isinstance(programs[0], list) else programs
                found = [code.outcome(p) for p in programs if isinstance(p, str)]
                sample["execution"] = [{"passed": r.passed, "result": r.result} for r in found if r is not None]
        config = next(iter(out["configs"].values()), {})
        return {"sandboxed": code.sandboxed(), "samples": config.get("repeats"),
                "generation_kwargs": config.get("generation_kwargs"), "k": list(self.ks or code.DEFAULT_K),
                "timeout": self.timeout}


def _documents_scored(record: dict, task: str, metric: str, filt: str) -> Optional[int]:
    """How many documents a metric averages: a task's metric may cover only some documents (e.g.
    factqa's acc_seen), so count the samples that carry it; groups fall back to lm-eval's count."""
    samples = (record.get("samples") or {}).get(task)
    if samples:
        return sum(1 for s in samples if metric in s and s.get("filter", filt) == filt)
    return (record["n-samples"].get(task) or {}).get("effective")


def summary_rows(record: dict, suite: SuiteSpec) -> list[dict]:
    """Flat rows (task, metric, filter, n-shot, value, stderr) for tables: groups first, then
    tasks, skipping the subjects inside a group unless they are the suite's own tasks; then the
    rows of the suite's postprocess modules that have `summary_rows`."""
    results, groups = record["results"], record.get("groups") or {}
    inner = {t for subs in (record.get("group_subtasks") or {}).values() for t in subs}
    names = [n for n in record["tasks"]] + [n for n in results if n not in record["tasks"] and n not in inner]
    rows = []
    for name in names:
        values = groups.get(name) or results.get(name) or {}
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = values.get(f"{metric}_stderr,{filt}")
            rows.append({
                "task": name, "metric": metric, "filter": filt,
                "n_shot": record["n-shot"].get(name), "value": value,
                "stderr": stderr if isinstance(stderr, (int, float)) else None,
                "n": _documents_scored(record, name, metric, filt),
            })
    for key, module in postprocessors(suite).items():
        if record.get(key) and callable(getattr(module, "summary_rows", None)):
            rows += module.summary_rows(record)
    return rows
