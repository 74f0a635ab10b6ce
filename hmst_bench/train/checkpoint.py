"""Checkpoints for an exact resume: RUN/state/ holds everything a continued run needs.

    state/model.safetensors   weights at the checkpointed step
    state/optimizer.pt        optimiser and scheduler state
    state/trainer.pt          stage, step, budget meter, wall time, RNG states, runner extras
    state/<artifacts>         the model's non-weight state (`save_artifacts`), if it has any

The folder is written as a whole into a temp folder and swapped in (`util.atomic_dir`), so a
`kill -9` at any moment leaves either the previous checkpoint or the new one, never a mix. A
write that fails (disk full, quota, file size limit) raises the OSError it is, with the previous
checkpoint untouched; a checkpoint file that cannot be read raises `CheckpointDamaged` naming it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hmst_bench.train.rundir import STATE_DIR, RunError, load_weights, save_model_file
from hmst_bench.util import atomic_dir


class CheckpointDamaged(RunError):
    """A checkpoint file is truncated or unreadable: the run cannot resume from it."""


def _why(exc: BaseException) -> str:
    """The first sentence of an exception's message (torch's messages run on for lines)."""
    return (str(exc).splitlines() or [""])[0].split(". ")[0][:160] or type(exc).__name__


def _damaged(path: Path, exc: BaseException) -> CheckpointDamaged:
    return CheckpointDamaged(f"{path} is damaged ({_why(exc)}): the run cannot resume from this checkpoint; the file is kept. "
                             "Restore the run directory from a copy, or train again with another --out")


def _read(path: Path, load):
    """`load(path)`, with any failure to read or parse the file reported as CheckpointDamaged."""
    try:
        return load(path)
    except RunError:
        raise
    except Exception as exc:  # truncated zip or pickle, bad safetensors header, missing file, ...
        raise _damaged(path, exc) from None


class _Writes:
    """A file object for torch.save that keeps the OSError of a failed write: torch reports a
    full disk as "unexpected pos", and the caller should see "No space left on device"."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as fh:
        writes = _Writes(fh)
        try:
            torch.save(obj, writes)
        except RuntimeError:
            if writes.error is not None:
                raise writes.error from None
            raise


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_path(run_dir: str | Path) -> Path | None:
    """The checkpoint folder, or its moved-aside predecessor if a swap was cut short."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / STATE_DIR, run_dir / f".{STATE_DIR}.old"):
        if (candidate / "trainer.pt").exists():
            return candidate
    return None


def save_checkpoint(run_dir: str | Path, model, optimizer, scheduler, trainer_state: dict, scaler=None) -> None:
    with atomic_dir(Path(run_dir) / STATE_DIR) as tmp:
        save_model_file(model, tmp / "model.safetensors")
        model.save_artifacts(tmp)  # in the same atomic folder, so always from the same step
        _torch_save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                     "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "optimizer.pt")
        _torch_save({**trainer_state, "rng": rng_state()}, tmp / "trainer.pt")


def read_trainer_state(run_dir: str | Path) -> dict[str, Any] | None:
    """trainer.pt of the checkpoint in `run_dir` (None without one)."""
    path = state_path(run_dir)
    return None if path is None else _read(path / "trainer.pt", lambda p: torch.load(p, weights_only=False))


def load_checkpoint(run_dir: str | Path, model, optimizer, scheduler, scaler=None) -> dict[str, Any]:
    """Restore weights, artifacts, optimiser, scheduler, loss scaler and RNG in place; return
    the trainer state."""
    path = state_path(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint to resume from")
    # the pickles are read before the model is touched; a damaged file is named, never replaced
    opt = _read(path / "optimizer.pt", lambda p: torch.load(p, weights_only=False))
    trainer = _read(path / "trainer.pt", lambda p: torch.load(p, weights_only=False))
    _read(path / "model.safetensors", lambda p: load_weights(model, p))
    try:
        model.load_artifacts(path)
    except Exception as exc:
        raise CheckpointDamaged(f"{path}: the model's artifacts cannot be loaded ({_why(exc)}): the run cannot "
                                "resume from this checkpoint; its files are kept") from None
    try:
        optimizer.load_state_dict(opt["optimizer"])
        if scheduler is not None and opt["scheduler"] is not None:
            scheduler.load_state_dict(opt["scheduler"])
        if scaler is not None and opt.get("scaler") is not None:
            scaler.load_state_dict(opt["scaler"])
    except (KeyError, TypeError, ValueError) as exc:  # readable, but not this model's optimiser state
        raise _damaged(path / "optimizer.pt", exc) from None
    set_rng_state(trainer.pop("rng"))
    return trainer
