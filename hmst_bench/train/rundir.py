"""The run directory, hmst-bench's unit of reproducibility, and `load_run` to open one.

    RUN/run.json            what was trained, on what, for how much compute, with what result
    RUN/metrics.jsonl       one JSON line per logged step ("kind": "train") and validation ("val")
    RUN/tokenizer.json      + tokenizer_config.json: loadable by PreTrainedTokenizerFast
    RUN/model.safetensors   weights; RUN/model_config.json the config dataclass as JSON
    RUN/state/              optimiser, scheduler, RNG, meter and data position for an exact resume
    RUN/<artifacts>         the model's save_artifacts (non-weight state) and export (dense baselines: RUN/hf/)
    RUN/.hmst-bench.lock    written first by every `train` session: marks the folder as a run's
                            own, and is locked (flock) by the process writing the run

Every file is replaced atomically; a killed process leaves the previous version whole. A run
directory belongs to its run: hmst-bench writes only into a folder that is empty, absent, marked
by LOCK_FILE or holding a run.json hmst-bench wrote (runs from before the marker).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from hmst_bench.locking import FileLock, Locked
from hmst_bench.util import atomic_save, atomic_write, atomic_write_json

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
STATE_DIR = "state"
LOCK_FILE = ".hmst-bench.lock"
LOCK_TEXT = "hmst-bench run directory: this folder belongs to its run; locked (flock) while a process writes it\n"


class RunError(ValueError):
    """A run directory is missing, incomplete or made by something not installed."""


def read_info(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        raise RunError(f"{run_dir} is not a run directory (no {RUN_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} is not valid JSON ({exc.msg})") from None


def write_info(run_dir: str | Path, info: dict) -> None:
    atomic_write_json(Path(run_dir) / RUN_FILE, info)


def is_run_info(info: Any) -> bool:
    """Whether a parsed run.json looks written by hmst-bench (every run.json has these fields)."""
    return isinstance(info, dict) and isinstance(info.get("arch"), str) and isinstance(info.get("config"), dict)


def foreign_entries(run_dir: str | Path) -> list[str]:
    """The entries that make `run_dir` someone else's folder: none when it is absent, empty,
    marked by LOCK_FILE (every session writes it first) or holds a run.json hmst-bench wrote;
    otherwise the names of its entries (sorted), which a new run must not overwrite or delete."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    names = sorted(p.name for p in run_dir.iterdir())
    if not names or LOCK_FILE in names:
        return []
    try:
        if is_run_info(json.loads((run_dir / RUN_FILE).read_text())):
            return []
    except (OSError, ValueError):  # absent, unreadable or not JSON: not ours
        pass
    return names


class RunBusy(RunError):
    """Another live process is writing the run directory."""


def lock_run(run_dir: str | Path) -> FileLock:
    """Mark `run_dir` (an existing folder) as a run's own and lock it for this process: the lock
    is held until `release()` or the process ends (flock: a killed holder leaves no stale lock).
    Raises RunBusy naming the holder's pid (from /proc/locks), or OSError when the folder cannot be written."""
    try:
        lock = FileLock.acquire(Path(run_dir) / LOCK_FILE)
    except Locked as exc:
        who = f"pid {exc.pid}" if exc.pid else "another process"
        raise RunBusy(f"{run_dir} is in use by {who} (an hmst-bench train writing it); wait for it to finish, "
                      "stop it, or choose another --out") from None
    if lock.created:  # written once; a later session (refused or not) leaves the file as it is
        os.pwrite(lock.fd, LOCK_TEXT.encode(), 0)
    return lock


def save_model_file(model, path: str | Path) -> None:
    """The model's weights as safetensors (shared tensors stored once). A failed write raises
    the OSError it is (safetensors reports "No space left on device" only as text)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_model

    try:
        save_model(model, str(path))
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def save_weights(run_dir: str | Path, model, config_dict: dict) -> None:
    """Weights as safetensors (shared tensors stored once) and the config as JSON."""
    run_dir = Path(run_dir)
    atomic_save(run_dir / WEIGHTS_FILE, lambda p: save_model_file(model, p))
    atomic_write_json(run_dir / CONFIG_FILE, config_dict)


def publish_model(run_dir: str | Path, model, config_dict: dict) -> None:
    """Top-level copies for users and `load_run`: weights, config, the model's artifacts
    (`save_artifacts`) and extra export formats (`export`, e.g. RUN/hf/)."""
    save_weights(run_dir, model, config_dict)
    model.save_artifacts(Path(run_dir))
    model.export(Path(run_dir))


def load_weights(model, path: str | Path, allow_missing: bool = False) -> None:
    """Load safetensors weights; `allow_missing` lets a later training stage add new modules."""
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise RunError(f"{path} does not match the model: {str(exc).splitlines()[0]}") from None
    if unexpected or (missing and not allow_missing):
        raise RunError(f"{path} does not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")


class MetricsLog:
    """Append-only metrics.jsonl; `truncate_after(step)` drops lines a resume will redo."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE

    def append(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill; everything after it is gone too
        return rows

    def truncate_after(self, step: int, stage: str | None = None) -> None:
        """Drop the lines of `stage` logged after `step` (other stages' lines are kept)."""
        kept = [r for r in self.read() if r.get("stage") != stage or r.get("step", 0) <= step]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))


# ----------------------------------------------------------------------------- provenance


def versions(extra_distributions: tuple[str, ...] = ()) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("hmst-bench", "torch", "transformers", "lm-eval", "accelerate", "tokenizers", *extra_distributions):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_sha() -> str | None:
    """Commit of the hmst-bench checkout that ran (with "-dirty" if it had local changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


# ----------------------------------------------------------------------------- load_run


@dataclass
class Run:
    """A trained run, ready to evaluate: `.model` (eval mode), `.tokenizer`, `.spec`, `.info`."""

    path: Path
    model: Any
    tokenizer: Any
    spec: Any
    info: dict
    config: Any


def weights_path(run_dir: str | Path) -> Path:
    """RUN/model.safetensors, or RunError when the run has not checkpointed yet."""
    path = Path(run_dir) / WEIGHTS_FILE
    if not path.exists():
        raise RunError(f"{run_dir} has no {WEIGHTS_FILE}: the run never reached its first checkpoint")
    return path


def _check_loadable(path: Path, info: Any) -> None:
    """run.json must name the architecture and hold its config for the model to be rebuilt."""
    where = path / RUN_FILE
    if not isinstance(info, dict):
        raise RunError(f"{where} holds a JSON {type(info).__name__}, not a run's record (an object with arch and "
                       "config); restore the file or train the run again")
    for key, kind in (("arch", str), ("config", dict)):
        if not isinstance(info.get(key), kind):
            state = "lacks" if key not in info else "has a malformed"
            raise RunError(f"{where} {state} {key!r}, which rebuilding the model needs; restore the file or "
                           "train the run again")


def load_run(path: str | Path, device: str | None = None) -> Run:
    """Open a run directory: rebuild its architecture from run.json, load tokenizer and weights."""
    from hmst_bench.arch import config_from_dict
    from hmst_bench.data.tokenizer import load_tokenizer
    from hmst_bench.plugins import ArchitectureNotFound, get_registry
    from safetensors import SafetensorError

    path = Path(path)
    info = read_info(path)
    _check_loadable(path, info)
    weights = weights_path(path)
    try:
        spec = get_registry().arch(info["arch"])
    except ArchitectureNotFound as exc:
        raise RunError(f"{path} was trained with {info['arch']!r}, which is not available here: {exc}") from None
    from hmst_bench.arch import ConfigError
    from hmst_bench.data.tokenizer import TokenizerError

    try:
        config = config_from_dict(spec.config_cls, info["config"])
        tokenizer = load_tokenizer(path)
    except (ConfigError, TokenizerError) as exc:
        raise RunError(f"{path}: {exc}") from None
    if len(tokenizer) != config.vocab_size:
        raise RunError(f"{path}: tokenizer has {len(tokenizer)} tokens but the config says {config.vocab_size}")
    from hmst_bench.model import ContractError, check_built

    model = spec.build(config, tokenizer)
    try:
        check_built(spec, model)
    except ContractError as exc:
        raise RunError(f"{path}: {exc}") from None
    try:
        load_weights(model, weights)
    except SafetensorError as exc:  # a cut or overwritten file: its header or data do not add up
        raise RunError(f"{weights} is truncated or corrupt ({exc}); restore it, or train the run again") from None
    try:
        model.load_artifacts(path)
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: cannot load the model's artifacts: {exc}") from None
    if device:
        model.to(device)
    model.eval()
    return Run(path=path, model=model, tokenizer=tokenizer, spec=spec, info=info, config=config)
