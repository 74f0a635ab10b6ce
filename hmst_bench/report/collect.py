"""Read finished runs into the two tables every comparison is computed from. Reads run.json and
RUN/eval/*.json only, never a model.

- runs: one row per run (label, arch, budget, seed, total achieved FLOPs over its stages, tokens,
  validation loss and bits per byte, parameters, training tokens/s, inference FLOPs per token,
  digests), plus what makes runs comparable (tokenizer, corpus, seq_len, suite options);
- items: one row per run x suite x task x item x metric: the item's score, the cluster it shares
  with other items (MMLU subject, a factqa entity), the group it rolls up into, and for
  multiple-choice accuracy the model's confidence (for reliability diagrams and ECE).

A run's label is its experiment entry's label (runs/<name>/experiment.json) or, outside an
experiment, its architecture (plus size when one architecture appears at several sizes).
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path
from typing import Optional

from hmst_bench.experiment.plan import COST_FILE

# what must agree for two runs to be compared, and how it is named in the refusal
COMPARABLE = {"tokenizer_hash": "tokenizer", "corpus_fingerprint": "corpus", "seq_len": "sequence length"}


class CompareError(ValueError):
    """Runs that cannot be compared, or nothing to compare; the message is one line."""


def find_runs(patterns: list) -> list[Path]:
    """Run directories named by paths or globs; an experiment folder stands for all its runs."""
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern))) or []
        if not matches:
            raise CompareError(f"{pattern} matches no run directory; give run folders, globs or an experiment folder")
        for m in map(Path, matches):
            if (m / "run.json").exists():
                found.append(m)
            elif (m / "experiment.json").exists() or m.is_dir():
                found += sorted(p.parent for p in m.glob("**/run.json"))
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise CompareError(f"no run directories (folders with run.json) under {', '.join(map(str, patterns))}")
    return unique


def _experiment_labels(run: Path) -> tuple[Optional[str], Optional[dict]]:
    run = run.resolve()  # the experiment command hands over runs/<name>/... relative to the cwd
    for folder in (run.parent.parent, run.parent):
        try:
            exp = json.loads((folder / "experiment.json").read_text())
        except (OSError, ValueError):
            continue
        for r in exp.get("runs", []):
            if (folder / r["path"]).resolve() == run:
                return r["label"], exp
    return None, None


def total_flops(info: dict) -> float:
    """Achieved training FLOPs over every stage of the run."""
    earlier = sum((s or {}).get("achieved_flops") or 0.0 for s in (info.get("stages") or {}).values())
    return float(info.get("achieved_flops") or 0.0) + earlier


def read_run(path: Path) -> tuple[dict, dict]:
    """(row of the runs table, {suite: eval record}) for one run directory."""
    try:
        info = json.loads((path / "run.json").read_text())
    except (OSError, ValueError) as exc:
        raise CompareError(f"{path}/run.json cannot be read ({exc}); restore it or leave the run out") from None
    label, exp = _experiment_labels(path)
    records, cost = {}, None
    for file in sorted((path / "eval").glob("*.json")):
        try:
            record = json.loads(file.read_text())
        except (OSError, ValueError):
            continue  # a damaged result file counts as a missing suite
        if file.name == COST_FILE:
            cost = record
        elif isinstance(record, dict) and "samples" in record and "suite" in record:
            records[record["suite"]] = record
    seconds = info.get("wall_seconds") or 0
    for stage in (info.get("stages") or {}).values():
        seconds += (stage or {}).get("wall_seconds") or 0
    row = {
        "run": _shown(path), "label": label, "experiment": (exp or {}).get("name"), "arch": info.get("arch"),
        "size": info.get("size"), "stage": info.get("stage"), "budget": info.get("budget") if not info.get("stages")
        else _experiment_budget(exp, path, info), "seed": info.get("seed"), "status": info.get("status"),
        "achieved_flops": total_flops(info), "tokens": int(info.get("tokens") or 0) + sum(
            int((s or {}).get("tokens") or 0) for s in (info.get("stages") or {}).values()),
        "val_loss": _num(info.get("val_loss")), "val_bpb": _num(info.get("val_bpb")),
        "params_total": info.get("params_total"), "params_active": info.get("params_active"),
        "train_tokens_per_s": (info.get("tokens") or 0) / info["wall_seconds"] if info.get("wall_seconds") else math.nan,
        "train_seconds": seconds,
        "infer_flops_per_token": _num((cost or {}).get("flops_per_generated_token")),
        "config_hash": info.get("config_hash"),
        "tokenizer_hash": (info.get("tokenizer") or {}).get("hash"),
        "corpus_fingerprint": (info.get("corpus") or {}).get("fingerprint"),
        "corpus": info.get("corpus_spec"), "seq_len": (info.get("training") or {}).get("seq_len"),
        "versions": info.get("versions") or {}, "git_sha": info.get("git_sha"),
    }
    return row, records


def _shown(path: Path) -> str:
    """The run's name in a report: relative to the working folder when under it (a committed report
    then names `runs/<experiment>/...`, not this machine's absolute paths)."""
    import os

    rel = os.path.relpath(path)
    return path.as_posix() if rel.startswith("..") else Path(rel).as_posix()


def _experiment_budget(exp: Optional[dict], path: Path, info: dict) -> str:
    for r in (exp or {}).get("runs", []):
        if r["path"] == "/".join(path.parts[-2:]):
            return r["budget"]
    first = next(iter((info.get("stages") or {}).values()), {}) or {}
    return first.get("budget") or info.get("budget")


def _num(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def suite_options(record: dict) -> dict:
    """What decides which items a suite scored and how: compared across runs."""
    prov = record.get("provenance") or {}
    code = prov.get("code_execution") or {}
    return {"limit": prov.get("limit"), "num_fewshot": prov.get("num_fewshot"), "window": prov.get("window"),
            "samples": code.get("samples"), "verify": bool(prov.get("verification")), "data": {k: (v or {}).get("sha256") for k, v in (prov.get("data") or {}).items()}}


def item_rows(record: dict) -> list[dict]:
    """One row per task x item x metric of a suite record (numeric per-sample metrics only)."""
    from hmst_bench.eval import calibration

    parent = {leaf: group for group, leaves in (record.get("group_subtasks") or {}).items() for leaf in leaves}

    def top(task: str) -> str:  # MMLU: subject -> category -> mmlu; the report pools at the top
        seen = {task}
        while task in parent and parent[task] not in seen:
            task = parent[task]
            seen.add(task)
        return task

    rows = []
    for task, samples in (record.get("samples") or {}).items():
        confidence = {}
        try:  # multiple-choice tasks: the model's probability of its chosen answer
            filt, probs, _, _ = calibration.task_documents(record, task)
            ids = sorted(s.get("doc_id", 0) for s in samples if s.get("filter", "none") == filt)
            confidence = {doc: float(p.max()) for doc, p in zip(ids, probs)}
        except Exception:  # noqa: BLE001 - a task without one gold choice has no confidence (calibration says why)
            pass
        for s in samples:
            doc = s.get("doc") if isinstance(s.get("doc"), dict) else {}
            cluster = doc.get("cluster", doc.get("entity"))
            for metric in s.get("metrics") or []:
                value = s.get(metric)
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                    continue
                rows.append({"suite": record["suite"], "group": top(task), "task": task,
                             "filter": s.get("filter", "none"), "metric": metric, "item": str(s.get("doc_id")),
                             "doc_hash": s.get("doc_hash"), "cluster": None if cluster is None else str(cluster),
                             "score": float(value),
                             "confidence": confidence.get(s.get("doc_id"), math.nan) if metric == "acc" else math.nan})
    return rows


def collect(paths: list, allow_mismatch: bool = False):
    """(runs DataFrame, items DataFrame, mismatches): refuses incomparable runs unless allowed,
    in which case the differences are returned for the report to state."""
    import pandas as pd

    rows, items, options = [], [], {}
    for path in paths:
        row, records = read_run(Path(path))
        rows.append(row)
        for suite, record in records.items():
            options.setdefault(suite, []).append((row["run"], suite_options(record)))
            for item in item_rows(record):
                items.append({"run": row["run"], **item})
    runs = pd.DataFrame(rows)
    _label(runs)
    mismatches = _mismatches(runs, options)
    if mismatches and not allow_mismatch:
        raise CompareError(f"{mismatches[0]}; compare comparable runs, or pass --allow-mismatch to compare anyway "
                           "(the report then says so)")
    item_df = pd.DataFrame(items, columns=["run", "suite", "group", "task", "filter", "metric", "item", "doc_hash",
                                           "cluster", "score", "confidence"])
    return runs, item_df, mismatches


def _label(runs) -> None:
    """Runs outside an experiment: the architecture, plus the size where one arch has several."""
    missing = runs["label"].isna()
    if missing.any():
        sizes = runs[missing].groupby("arch")["size"].nunique()
        runs.loc[missing, "label"] = [a if sizes.get(a, 1) <= 1 else f"{a}-{s}"
                                      for a, s in zip(runs.loc[missing, "arch"], runs.loc[missing, "size"])]


def comparability(runs) -> list[str]:
    """What differs between runs that must agree (tokenizer, corpus, window), one line each."""
    return _mismatches(runs, {})


def _mismatches(runs, options: dict) -> list[str]:
    out = []
    for column, what in COMPARABLE.items():
        values = runs[column].dropna().astype(str).unique()
        if len(values) > 1:
            a, b = runs[runs[column].astype(str) == values[0]].iloc[0], runs[runs[column].astype(str) == values[1]].iloc[0]
            out.append(f"different {what}: {a['run']} has {values[0]}, {b['run']} has {values[1]}")
    for suite, seen in options.items():
        first_run, first = seen[0]
        for run, opts in seen[1:]:
            diff = [k for k in first if first[k] != opts[k]]
            if diff:
                out.append(f"different {suite} options ({diff[0]}): {first_run} has {first[diff[0]]}, {run} has {opts[diff[0]]}")
                break
    return out
