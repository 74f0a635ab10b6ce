"""Checkpoints for an exact resume: RUN/state/ holds everything a continued run needs.

    state/model.safetensors   weights at the checkpointed step
    state/optimizer.pt        optimiser and scheduler state
    state/trainer.pt          stage, step, budget meter, wall time, RNG states, runner extras
    state/<artifacts>         the model's non-weight state (`save_artifacts`), if it has any

The folder is written as a whole into a temp folder and swapped in (`util.atomic_dir`), so a
`kill -9` at any moment leaves either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hmst_bench.train.rundir import STATE_DIR, load_weights
from hmst_bench.util import atomic_dir


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
    from safetensors.torch import save_model

    with atomic_dir(Path(run_dir) / STATE_DIR) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        if hasattr(model, "save_artifacts"):  # in the same atomic folder, so always from the same step
            model.save_artifacts(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "optimizer.pt")
        torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer.pt")


def read_trainer_state(run_dir: str | Path) -> dict[str, Any] | None:
    """trainer.pt of the checkpoint in `run_dir` (None without one)."""
    path = state_path(run_dir)
    return None if path is None else torch.load(path / "trainer.pt", weights_only=False)


def load_checkpoint(run_dir: str | Path, model, optimizer, scheduler, scaler=None) -> dict[str, Any]:
    """Restore weights, artifacts, optimiser, scheduler, loss scaler and RNG in place; return
    the trainer state."""
    path = state_path(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint to resume from")
    load_weights(model, path / "model.safetensors")
    if hasattr(model, "load_artifacts"):
        model.load_artifacts(path)
    opt = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    if scheduler is not None and opt["scheduler"] is not None:
        scheduler.load_state_dict(opt["scheduler"])
    if scaler is not None and opt.get("scaler") is not None:
        scaler.load_state_dict(opt["scaler"])
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    set_rng_state(trainer.pop("rng"))
    return trainer
