"""`hmst-bench eval`: run registered suites on a run directory through lm-eval and record them.

For each suite: check that its benchmark data is in the store, build an lm-eval `TaskManager`
over the suite configs (lm-eval's built-in task index is not scanned: our configs read the
store and never the hub), and call `lm_eval.simple_evaluate` with the `hmst-bench` model
(`hmst_bench.eval.lm`) wrapped in lm-eval's request cache. The cache lives in
`RUN/eval/cache/` and is keyed by the sha256 of everything the model is loaded from (plus
device, window and default generation length), so an interrupted evaluation resumes and a
repeated one is served from it, while a run trained further starts afresh.

`RUN/eval/<suite>.json` is written atomically and holds lm-eval's results, group results,
configs, versions and n-shot, the per-sample log in lm-eval's samples format, and provenance.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import json
import logging
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

from hmst_bench.eval.suite import SuiteSpec
from hmst_bench.util import atomic_write

EVAL_DIR = "eval"
CACHE_DIR = "cache"
# lm-eval's own defaults (random, numpy, torch, few-shot); `--seed N` sets all four to N
DEFAULT_SEEDS = (0, 1234, 1234, 1234)
# Metrics computed from a finished suite's per-sample log, beyond lm-eval's own: each entry is
# "module:function", called as function(record, lm, out_dir) -> dict (empty when the suite has
# nothing for it) and stored under record[key]; out_dir is RUN/eval for figures it writes.
POSTPROCESSORS: dict[str, str] = {"hallucination": "hmst_bench.eval.hallucination:postprocess",
                                  "calibration": "hmst_bench.eval.calibration:postprocess"}


class EvalError(ValueError):
    """Bad input to `hmst-bench eval`; the message is one line naming the fix."""


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
) -> list[dict]:
    """Evaluate every suite; returns the records written to RUN/eval/<suite>.json."""
    import lm_eval
    import torch

    from hmst_bench.eval.lm import HmstBenchLM
    from hmst_bench.train.rundir import git_sha, load_run, read_info

    run_dir = Path(run_dir)
    read_info(run_dir)  # RunError for a directory that is not a run
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be at least 1, got {limit}")
    manifests = check_data(suites)
    fingerprint = model_fingerprint(run_dir)
    run = load_run(run_dir)
    if model_fingerprint(run_dir) != fingerprint:  # a training job checkpointed meanwhile
        raise EvalError(f"{run_dir} changed while it was loading (is it still training?); evaluate it again")
    lm = HmstBenchLM(run=run, device=device, batch_size=batch_size, progress=progress)
    # lm-eval keys each answer by the request; the file name adds what else decides the answer:
    # the model's files, the code that computes it, device, window and default generation length
    code = hashlib.sha256(repr((_version("hmst-bench"), _version("lm_eval"), run.spec.distribution,
                                _version(run.spec.distribution) if run.spec.distribution else None)).encode())
    cache = run_dir / EVAL_DIR / CACHE_DIR / (
        f"lm-{fingerprint['model_sha256'][:16]}-{code.hexdigest()[:8]}-{lm.device.type}"
        f"-w{lm.max_length}-g{lm.max_gen_toks}")
    seeds = DEFAULT_SEEDS if seed is None else (seed,) * 4
    manager = task_manager(suites)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # our table reports; lm-eval's INFO is noise here

    records = []
    for suite in suites:
        started = time.time()
        before = dict(lm.computed)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(suite.tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            use_cache=str(cache) if use_cache else None,
            task_manager=manager,
            log_samples=True,
            random_seed=seeds[0],
            numpy_random_seed=seeds[1],
            torch_random_seed=seeds[2],
            fewshot_random_seed=seeds[3],
            batch_size=lm.batch_size,
            device=str(lm.device),
        )
        computed = {k: lm.computed[k] - before[k] for k in lm.computed}
        # one sample per document and filter; every filter sees the same responses
        per_doc = {(task, s["doc_id"]): len(s["resps"]) for task, rows in out["samples"].items() for s in rows}
        requests = sum(per_doc.values())
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
                "requests": {"total": requests, "computed": sum(computed.values()),
                             "from_cache": max(requests - sum(computed.values()), 0)},
                "seconds": round(time.time() - started, 2),
            },
        }
        for key, target in POSTPROCESSORS.items():
            module, func = target.split(":")
            extra = getattr(importlib.import_module(module), func)(record, lm, run_dir / EVAL_DIR)
            if extra:
                record[key] = extra
        atomic_write(run_dir / EVAL_DIR / f"{suite.name}.json", _jsonable(record))
        records.append(record)
        if on_suite is not None:
            on_suite(record)
    return records


def summary_rows(record: dict) -> list[dict]:
    """Flat rows (task, metric, filter, n-shot, value, stderr) for tables: groups first, then
    tasks, skipping the subjects inside a group unless they are the suite's own tasks."""
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
                "n": (record["n-samples"].get(name) or {}).get("effective"),
            })
    return rows
