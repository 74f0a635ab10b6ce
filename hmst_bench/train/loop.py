"""`train(settings)`: from a `hmst-bench train` command line to a finished run directory.

    resolve arch, size, config and recipe (for --resume: from run.json, refusing any change)
    (--init-from RUN: arch, size and config from RUN, a new run starting from its final weights;
     or, for an architecture that declares `base_from_run`, RUN as its pretrained base)
    -> tokenizer (trained on the corpus, or reused from --tokenizer RUN or --init-from RUN)
    -> packed token data (or masked prompt/completion rows for an example corpus)
    -> build the model under the seed -> accelerate (devices, DDP, mixed precision)
    -> the architecture's stage runner, or `shared_loop`: probe FLOPs per step on the real first
       batch, refuse a budget below one step, plan the schedule, step until achieved >= budget
    -> final validation, weights, artifacts and run.json (status complete)

SIGINT/SIGTERM end the current step, write a checkpoint and mark the run `interrupted`; a
NaN/inf loss stops with `TrainingDiverged`, keeping the last good checkpoint. A session first
claims `--out` (`_claim`): a folder holding files hmst-bench did not write is refused, and the
folder is locked for the session, so a second `train` into it is refused naming the first's pid.
`--resume` of a complete run raises `RunComplete` and changes nothing.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from hmst_bench.arch import ConfigError, config_from_dict, config_hash, config_to_dict
from hmst_bench.budget import BudgetMeter, parse_budget
from hmst_bench.model import CONTRACT_VERSION, ContractError, check_built
from hmst_bench.train import rundir
from hmst_bench.train.checkpoint import CheckpointDamaged, read_trainer_state
from hmst_bench.train.context import LossModule, Recipe, TrainContext, TrainingDiverged, make_optimizer

DEFAULTS = {"size": "tiny", "corpus": "stdlib-code"}


class TrainError(ValueError):
    """A user mistake found before or while training; the message says what to do."""


class RunComplete(Exception):
    """`--resume` of a run that is already complete: there is nothing to do and nothing was
    changed. `info` is its run.json."""

    def __init__(self, message: str, info: dict):
        super().__init__(message)
        self.info = info


# errors of a write that failed for lack of room or permission, not for a bug
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


@dataclass
class TrainSettings:
    """What `hmst-bench train` was asked. None means "default" (or, with --resume, "as recorded")."""

    arch: Optional[str] = None
    budget: Optional[str] = None
    out: Optional[Path] = None
    size: Optional[str] = None
    corpus: Optional[str] = None
    resume: bool = False
    tokenizer: Optional[Path] = None
    init_from: Optional[Path] = None  # a complete run whose final weights, tokenizer and config start this one
    overrides: dict = field(default_factory=dict)
    stage: Optional[str] = None
    # recipe fields (None: Recipe default or recorded value)
    seed: Optional[int] = None
    batch_size: Optional[int] = None
    seq_len: Optional[int] = None
    grad_accum: Optional[int] = None
    lr: Optional[float] = None
    warmup: Optional[int] = None
    mixed_precision: Optional[str] = None
    # bookkeeping (None: default, or with --resume the recorded value; may be changed on resume)
    save_every: Optional[int] = None  # default 250; 0: only at the end
    eval_every: Optional[int] = None  # default 0: about five validations per run
    log_every: int = 10
    val_tokens: int = 32768
    # --strict / HMST_BENCH_STRICT=1 (None: read the variable): refuse a model running ops the FLOP
    # counter cannot see (budget.uncounted_work) that its extra_flops does not declare
    strict: Optional[bool] = None


RECIPE_FLAGS = {"seed": "--seed", "batch_size": "--batch-size", "seq_len": "--seq-len", "grad_accum": "--grad-accum",
                "lr": "--lr", "warmup": "--warmup", "mixed_precision": "--mixed-precision"}


def _resolve(settings: TrainSettings, registry) -> tuple[Any, dict, Any, Recipe, Optional[dict], Optional[dict]]:
    """Returns (spec, run-level choices, config without vocab, recipe, recorded info when resuming,
    the finished earlier stage's info when starting the next stage of a staged run)."""
    from hmst_bench.plugins import ArchitectureNotFound

    out = Path(settings.out)
    recorded = None
    previous = None  # a complete earlier stage in --out, continued by this one
    given_corpus = settings.corpus
    if given_corpus and not given_corpus.startswith("hf:") and Path(given_corpus).expanduser().exists():
        given_corpus = str(Path(given_corpus).expanduser().resolve())  # so --resume works from any folder
    init = _init_from(settings, registry) if settings.init_from is not None else None
    if init is not None and (out / rundir.RUN_FILE).exists():
        raise TrainError(f"{out} already holds a run; --init-from starts a new run: choose another --out")
    if settings.resume:
        try:
            recorded = rundir.read_info(out)
        except rundir.RunError as exc:
            raise TrainError(f"cannot resume: {exc}") from None
        for key, given in (("arch", settings.arch), ("size", settings.size), ("corpus", given_corpus),
                           ("budget", settings.budget), ("stage", settings.stage)):
            if given is not None and str(given) != str(recorded.get(key if key != "corpus" else "corpus_spec")):
                have = recorded.get(key if key != "corpus" else "corpus_spec")
                raise TrainError(f"{out} was trained with --{key} {have}; resume it with the same value or start a new --out")
    elif (out / rundir.RUN_FILE).exists():
        if settings.stage is None:
            raise TrainError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        previous = _previous_stage(out, settings, registry)

    base = recorded or previous or init or {}
    arch = settings.arch or base.get("arch")
    if not arch:
        raise TrainError("--arch is required (see `hmst-bench list archs`)")
    try:
        spec = registry.arch(arch)
    except ArchitectureNotFound as exc:
        raise TrainError(str(exc)) from None
    choices = {
        "arch": arch,
        "size": settings.size or base.get("size") or DEFAULTS["size"],
        "corpus": given_corpus or base.get("corpus_spec") or DEFAULTS["corpus"],
        "budget": settings.budget or (recorded or {}).get("budget"),
        "stage": settings.stage or (recorded or init or {}).get("stage") or (spec.stages[0] if spec.stages else None),
        "init_from": (recorded or {}).get("init_from") or (init and {
            "run": str(Path(settings.init_from).resolve()), "arch": init["arch"], "config_hash": init.get("config_hash"),
            "achieved_flops": init.get("achieved_flops"), "corpus_spec": init.get("corpus_spec"),
            **({"as_base": True} if init["arch"] != spec.name else {})}),
    }
    as_base = bool(init is not None and choices["init_from"].get("as_base"))  # RUN is this model's pretrained base
    if previous is not None and choices["size"] != previous["size"]:
        raise TrainError(f"{out} was trained at --size {previous['size']}; a later stage keeps the size")
    if not choices["budget"]:
        raise TrainError("--budget is required, e.g. --budget 1e15 (FLOPs) or --budget 20Mtok")
    if spec.stages and choices["stage"] not in spec.stages:
        raise TrainError(f"{arch} has stages {', '.join(spec.stages)}; --stage {choices['stage']} is not one of them")
    if not spec.stages and choices["stage"] is not None:
        raise TrainError(f"{arch} trains in a single stage; drop --stage")

    try:
        if as_base:
            config = spec.make_config(choices["size"], {**spec.base_from_run(Path(settings.init_from).resolve()),
                                                         **settings.overrides})
        elif previous is not None or init is not None:  # start from the earlier stage's (RUN's) config, plus --set
            changes = dict(spec.stage_config(choices["stage"]) or {}) if previous is not None and spec.stage_config else {}
            config = _replace(config_from_dict(spec.config_cls, (previous or init)["config"]), **{**changes, **settings.overrides})
        elif recorded is not None and not settings.overrides and settings.size is None:
            config = config_from_dict(spec.config_cls, recorded["config"])
        else:
            config = spec.make_config(choices["size"], settings.overrides)
    except ConfigError as exc:
        raise TrainError(str(exc)) from None

    recipe_values = {}
    for name in RECIPE_FLAGS:
        given = getattr(settings, name)
        have = (recorded or {}).get("training", {}).get(name) if recorded else None
        if recorded is not None and given is not None and given != have:
            raise TrainError(f"{out} was trained with {RECIPE_FLAGS[name]} {have}; resume it with the same value or start a new --out")
        if previous is not None:
            have = previous.get("training", {}).get(name)  # a later stage inherits, and may change, the recipe
        value = given if given is not None else have
        if value is not None:
            recipe_values[name] = value
    recipe_values.setdefault("seq_len", config.max_seq_len)
    recipe = Recipe(**recipe_values)
    if recipe.seq_len != config.max_seq_len:
        config = _replace(config, max_seq_len=recipe.seq_len)
    if recorded is not None:  # refuse a changed config before any corpus or tokenizer work
        same_vocab = _replace(config, vocab_size=recorded["config"]["vocab_size"])
        if config_hash(same_vocab) != recorded.get("config_hash"):
            raise TrainError(f"{out} was trained with config {recorded.get('config_hash')}, not {config_hash(same_vocab)}; "
                             "resume with the same --size and --set values")

    for name in ("batch_size", "seq_len", "grad_accum"):
        if getattr(recipe, name) <= 0:
            raise TrainError(f"{RECIPE_FLAGS[name]} must be positive")
    if recipe.mixed_precision not in ("no", "bf16", "fp16"):
        raise TrainError("--mixed-precision must be no, bf16 or fp16")
    return spec, choices, config, recipe, recorded, previous


def _init_from(settings: TrainSettings, registry) -> dict:
    """`--init-from RUN`: RUN's run.json, after refusing what cannot start a new run from it."""
    from hmst_bench.plugins import ArchitectureNotFound

    run = Path(settings.init_from)
    if settings.resume:
        raise TrainError("--init-from starts a new run; --resume continues the run in --out from its own checkpoint: drop one")
    if settings.tokenizer is not None:
        raise TrainError(f"--init-from uses the tokenizer of {run}; drop --tokenizer")
    try:
        init = rundir.read_info(run)
    except rundir.RunError as exc:
        raise TrainError(f"--init-from: {exc}") from None
    if init.get("status") != "complete":
        raise TrainError(f"--init-from {run}: the run is {init.get('status')}, not complete; "
                         f"finish it with `hmst-bench train --resume --out {run}` first")
    if not (run / rundir.WEIGHTS_FILE).exists():
        raise TrainError(f"--init-from {run}: no {rundir.WEIGHTS_FILE} in the run directory")
    if settings.arch is not None:
        try:
            name = registry.arch(settings.arch).name
        except ArchitectureNotFound as exc:
            raise TrainError(str(exc)) from None
        if name != init.get("arch") and registry.arch(settings.arch).base_from_run is None:
            raise TrainError(f"{run} is a {init.get('arch')} run; --init-from keeps its architecture: drop --arch {settings.arch}")
    if settings.size is not None and settings.size != init.get("size"):
        raise TrainError(f"{run} was trained at --size {init.get('size')}; --init-from keeps its size: drop --size {settings.size}")
    return init


def _previous_stage(out: Path, settings: TrainSettings, registry) -> dict:
    """`--stage S --out R` where R holds a complete earlier stage: S continues it in R."""
    from hmst_bench.plugins import ArchitectureNotFound

    prior = rundir.read_info(out)
    try:
        spec = registry.arch(settings.arch or prior["arch"])
    except ArchitectureNotFound as exc:
        raise TrainError(str(exc)) from None
    if spec.name != prior["arch"]:
        raise TrainError(f"{out} holds a {prior['arch']} run; a later stage must use the same --arch")
    stages = list(spec.stages)
    if stages and settings.stage not in stages:
        raise TrainError(f"{spec.name} has stages {', '.join(stages)}; --stage {settings.stage} is not one of them")
    if settings.stage not in stages or prior.get("stage") not in stages:
        raise TrainError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if stages.index(settings.stage) <= stages.index(prior["stage"]):
        raise TrainError(f"{out} is at stage {prior['stage']}; --stage {settings.stage} does not come after it "
                         f"(stages: {', '.join(stages)}); pass --resume to continue stage {prior['stage']}")
    if prior.get("status") != "complete":
        raise TrainError(f"stage {prior['stage']} in {out} is {prior.get('status')}; finish it with --resume first")
    return prior


STAGE_FIELDS = ("stage", "budget", "budget_kind", "budget_flops", "budget_tokens", "achieved_flops", "tokens", "steps",
                "flops_per_step", "flops_per_token", "planned_steps", "wall_seconds", "final_train_loss", "val_loss",
                "val_bpb", "config_hash", "corpus_spec", "stage_data", "status")


def _replace(config, **changes):
    try:
        return dataclasses.replace(config, **changes)
    except (TypeError, ValueError) as exc:  # ConfigError is a ValueError; plugins may raise either
        raise TrainError(f"{type(config).__name__}: {exc}") from None


def _prepare_out(out: Path) -> None:
    """Make sure `out` is a writable folder."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)  # unique: ranks may probe at once
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise TrainError(f"cannot write to {out} ({exc.strerror}); choose a writable --out") from None


def round_up(x: float) -> str:
    """x rounded up to three significant digits, so the stated minimum budget suffices."""
    import math

    if x <= 0:
        return "0"
    unit = 10 ** (math.floor(math.log10(x)) - 2)
    return f"{math.ceil(x / unit) * unit:.3g}"


def _roll_back(out: Path, previous: Optional[dict], stage: Optional[str]) -> None:
    """Undo what a session wrote before its first checkpoint, so a refused or crashed start
    leaves `out` as it found it: empty for a new run, at the earlier stage for a next stage."""
    if previous is not None:
        rundir.write_info(out, previous)
        rundir.MetricsLog(out).truncate_after(-1, stage=stage)
        return
    for name in (rundir.RUN_FILE, rundir.METRICS_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).unlink(missing_ok=True)


def _tokenizer(settings: TrainSettings, choices: dict, config, corpus, recorded) -> tuple[Any, dict]:
    from hmst_bench.data.tokenizer import TokenizerError, load_tokenizer, tokenizer_hash, train_tokenizer

    try:
        if recorded is not None:
            tok, source = load_tokenizer(settings.out), recorded.get("tokenizer", {}).get("source", "trained")
        elif choices.get("init_from"):
            run = choices["init_from"]["run"]
            tok, source = load_tokenizer(run), f"run:{run}"
        elif settings.tokenizer is not None:
            tok, source = load_tokenizer(settings.tokenizer), f"run:{Path(settings.tokenizer).resolve()}"
        else:
            tok, source = train_tokenizer(corpus.split["train"], config.vocab_size, cache_key=corpus.fingerprint), "trained"
    except TokenizerError as exc:
        raise TrainError(str(exc)) from None
    return tok, {"source": source, "vocab_size": len(tok), "hash": tokenizer_hash(tok),
                 "pad_id": tok.pad_token_id, "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id}


def _check_contract(spec, model) -> None:
    """Refuse, in one line, a plugin whose model is not a `hmst_bench.LanguageModel`."""
    try:
        check_built(spec, model)
    except ContractError as exc:
        raise TrainError(str(exc)) from None


def count_params(model) -> tuple[int, int]:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total, int(model.num_active_params())


def shared_loop(ctx: TrainContext) -> None:
    """The default training loop: every architecture without its own stage runner uses it."""
    if ctx.resuming:
        ctx.restore()
    else:
        start_budget(ctx, ctx.probe_flops(ctx.batches(0)))
    while not ctx.should_stop:
        ctx.train_step()


def start_budget(ctx: TrainContext, flops_per_step: float, segments: int = 1) -> None:
    """Fix a fresh run's FLOPs per optimiser step (measured on real batches), refuse a budget
    below one step and plan the schedule. `segments`: optimiser steps a sequence stays in the
    batch (a stage runner with deep supervision), so a token budget plans that many more steps."""
    fps = flops_per_step
    ctx.meter.flops_per_step = fps
    if ctx.budget.kind == "tokens" and ctx.budget.amount < ctx.tokens_per_step:
        raise TrainError(
            f"budget {ctx.budget.text} is below one training step ({ctx.tokens_per_step} tokens at batch "
            f"{ctx.recipe.batch_size} x seq {ctx.row_tokens or ctx.recipe.seq_len}); use --budget {ctx.tokens_per_step}tok or more"
        )
    if fps <= 0 and ctx.budget.kind == "flops":
        raise TrainError(
            f"{ctx.spec.name}: the FLOP counter saw no work in a training step; the model must declare "
            "the cost of ops the counter cannot see with extra_flops(batch), or train with a token budget"
        )
    if ctx.budget.kind == "flops" and ctx.budget.amount < fps:
        raise TrainError(
            f"budget {ctx.budget.text} is below one training step ({fps:.3g} FLOPs at batch "
            f"{ctx.recipe.batch_size} x seq {ctx.row_tokens or ctx.recipe.seq_len}); use --budget {round_up(fps)} or more"
        )
    steps = ctx.budget.steps_for(fps, ctx.tokens_per_step)
    ctx.plan(steps * segments if ctx.budget.kind == "tokens" else steps)


def train(settings: TrainSettings, progress: Optional[Callable[[TrainContext], None]] = None,
          warn: Optional[Callable[[str], None]] = None) -> dict:
    """Run (or resume) training; returns run.json's content. Raises TrainError / TrainingDiverged,
    or RunComplete for `--resume` of a complete run. A start that fails before its first
    checkpoint leaves no trace (see `_roll_back`), and a failed session never deletes a file it
    did not create. `warn(message)` shows a one-line warning (default: warnings.warn)."""
    if settings.out is None:
        raise TrainError("--out is required")
    if settings.lr is not None and not (math.isfinite(settings.lr) and settings.lr > 0):
        raise TrainError(f"--lr must be a positive finite number, e.g. --lr 1e-3 (got {settings.lr})")
    out = Path(settings.out)
    new_folder = not out.exists()
    lock = None
    try:
        lock = _claim(out, settings)
        return _train(settings, progress, warn or _warn)
    except BaseException as exc:
        if lock is not None and lock.created:
            # the marker goes with the session that created it: a refused start leaves the folder
            # as it was, and a run that keeps files is still marked by its run.json
            lock.remove()
        if new_folder and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if isinstance(exc, CheckpointDamaged):  # found on resume: one line, the file kept
            raise TrainError(str(exc)) from None
        raise
    finally:
        if lock is not None:
            lock.release()


def _claim(out: Path, settings: TrainSettings):
    """Make sure `out` is this run's to write, then lock it for the session (rank 0 only; the
    other ranks of a data-parallel launch write nothing). Returns the lock (None off rank 0).

    - a new run (or stage) needs `out` absent, empty or a run's own (`rundir.foreign_entries`);
    - `--resume` needs a run.json hmst-bench wrote, and ends here if the run is complete (after
      checking the flags against the record): no corpus is read and nothing is written, not even
      the lock file, so there is no lock to take;
    - a live process holding the lock refuses the session, naming its pid; a dead one's lock is
      gone with it (flock)."""
    if settings.resume and settings.init_from is None:  # with --init-from, _resolve refuses the pair
        try:
            info = rundir.read_info(out)
        except rundir.RunError as exc:
            raise TrainError(f"cannot resume: {exc}") from None
        if not rundir.is_run_info(info):
            raise TrainError(f"cannot resume: {out}/{rundir.RUN_FILE} was not written by hmst-bench; choose the run's own --out")
        if info.get("status") == "complete":
            from hmst_bench.plugins import get_registry

            _resolve(settings, get_registry())  # flags that differ from the record are still refused
            stage = f" stage {info['stage']}" if info.get("stage") else ""
            raise RunComplete(f"{out}{stage} is already complete ({info.get('steps')} steps, budget {info.get('budget')} reached); "
                              "nothing to resume and nothing was changed", info)
    else:
        foreign = rundir.foreign_entries(out)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise TrainError(f"{out} holds files hmst-bench did not write ({shown}); choose another --out or empty it")
    if os.environ.get("RANK", "0") != "0":
        return None
    try:
        out.mkdir(parents=True, exist_ok=True)
        return rundir.lock_run(out)
    except rundir.RunBusy as exc:
        raise TrainError(str(exc)) from None
    except OSError as exc:
        raise TrainError(f"cannot write to {out} ({exc.strerror}); choose a writable --out") from None


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, UncountedFlopsWarning, stacklevel=2)


class UncountedFlopsWarning(UserWarning):
    """The model ran ops the FLOP counter cannot see and its extra_flops does not declare."""


def uncounted_message(spec, ops: list[str]) -> str:
    """One line naming the ops and the hook that fixes it (the warning; --strict's error adds to it)."""
    return (f"{spec.name} ({spec.distribution or 'plugin'}) runs {', '.join(ops)}, which the FLOP counter has no "
            "formula for, so their compute is not charged to the budget; declare it in the model's extra_flops(batch) "
            "and name the ops in its extra_flops_covers (docs/plugin-guide.md)")


def _train(settings: TrainSettings, progress: Optional[Callable[[TrainContext], None]],
           warn: Callable[[str], None]) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from hmst_bench.budget import BudgetError
    from hmst_bench.data.corpora import CorpusError, load_corpus, python_tag
    from hmst_bench.data.tokenizer import save_tokenizer, token_byte_lengths
    from hmst_bench.data.tokens import encode_corpus
    from hmst_bench.plugins import get_registry

    out = Path(settings.out)
    spec, choices, config, recipe, recorded, previous = _resolve(settings, get_registry())
    base = recorded or previous  # the run.json this session builds on, if any
    try:
        budget = parse_budget(choices["budget"])
    except BudgetError as exc:
        raise TrainError(str(exc)) from None
    _prepare_out(out)

    try:
        corpus = load_corpus(choices["corpus"])
        corpus.split  # noqa: B018 - read now, so a bad corpus fails before any model is built
    except CorpusError as exc:
        raise TrainError(str(exc)) from None
    if recorded is not None and recorded.get("corpus", {}).get("fingerprint") != corpus.fingerprint:
        raise TrainError(f"the corpus {choices['corpus']} has changed since {out} was trained "
                         f"(fingerprint {corpus.fingerprint}, was {recorded.get('corpus', {}).get('fingerprint')}); "
                         "an exact resume needs the same text")
    tok, tok_info = _tokenizer(settings, choices, config, corpus, base)
    config = _replace(config, vocab_size=len(tok))
    chash = config_hash(config)
    if recorded is not None and recorded.get("config_hash") != chash:
        raise TrainError(f"{out} was trained with config {recorded.get('config_hash')}, not {chash}; resume with the same --size and --set values")
    data = encode_corpus(corpus, tok)
    try:
        data.check_seq_len(recipe.seq_len)
    except ValueError as exc:
        raise TrainError(str(exc)) from None

    AcceleratorState._reset_state()  # a second train() in one process may use another precision
    accelerator = Accelerator(mixed_precision=recipe.mixed_precision)
    torch.manual_seed(recipe.seed)
    try:
        model = spec.build(config, tok)
    except (Exception, SystemExit) as exc:  # the plugin's own code: one line naming it, as for any plugin failure
        from hmst_bench.plugins import describe_error

        raise TrainError(f"{spec.name} ({spec.distribution or 'plugin'}): build() failed: {describe_error(exc)}") from None
    _check_contract(spec, model)
    stage_ckpt = checkpoint_stage(out)
    resuming = settings.resume and stage_ckpt is not None and stage_ckpt == (choices["stage"] or "")
    from_earlier_stage = not resuming and base is not None and (previous is not None or bool(base.get("stages")))
    if from_earlier_stage:
        # a later stage starts from the earlier stage's final weights; modules new in this stage
        # (absent from those weights) keep their initialisation
        try:
            rundir.load_weights(model, out / rundir.WEIGHTS_FILE, allow_missing=True)
        except rundir.RunError as exc:
            raise TrainError(f"cannot start stage {choices['stage']} from the earlier stage: {exc}") from None
        model.load_artifacts(out)
    elif not resuming and choices["init_from"] and not choices["init_from"].get("as_base"):
        _load_init(model, Path(choices["init_from"]["run"]))
    elif not resuming:
        model.prepare(data.train)  # state derived from the training data, e.g. a Huffman tree
    model.train()
    params_total, params_active = count_params(model)
    optimizer = make_optimizer(model, recipe)
    wrapped, optimizer = accelerator.prepare(LossModule(model), optimizer)
    meter = BudgetMeter(budget, world_size=accelerator.num_processes)
    from hmst_bench.plugins import env_flag

    strict = settings.strict if settings.strict is not None else env_flag("HMST_BENCH_STRICT")

    def uncounted(ops: list[str]) -> None:  # first seen by a measurement (the probe, or a runner's step)
        if strict:
            raise TrainError(f"{uncounted_message(spec, ops)}; refused under --strict (HMST_BENCH_STRICT)")
        if accelerator.is_main_process:
            warn(uncounted_message(spec, ops))

    meter.on_uncounted = uncounted
    if recorded is not None and recorded.get("training", {}).get("world_size") != accelerator.num_processes:
        raise TrainError(f"{out} was trained on {recorded['training'].get('world_size')} process(es), this resume "
                         f"has {accelerator.num_processes}; launch it the same way")

    kept = (recorded or {}).get("training", {})
    save_every = settings.save_every if settings.save_every is not None else kept.get("save_every", 250)
    eval_every = settings.eval_every if settings.eval_every is not None else kept.get("eval_every", 0)
    ctx = TrainContext(
        spec=spec, config=config, model=model, wrapped=wrapped, optimizer=optimizer, accelerator=accelerator,
        tokenizer=tok, data=data, recipe=recipe, budget=budget, meter=meter, run_dir=out,
        byte_lengths=token_byte_lengths(tok), stage=choices["stage"], resuming=resuming,
        save_every=save_every, eval_every=eval_every, log_every=max(1, settings.log_every), val_tokens=settings.val_tokens,
        on_progress=progress or (lambda ctx: None),
    )
    if recorded is not None and not ctx.resuming and accelerator.is_main_process:  # killed before its first checkpoint: start over
        rundir.MetricsLog(out).truncate_after(0, stage=choices["stage"])

    info = dict(base or {})
    if previous is not None:  # keep the finished stage's record; this stage's fields replace it on top
        info["stages"] = {**previous.get("stages", {}), previous["stage"]: {k: previous.get(k) for k in STAGE_FIELDS}}
    info.update({
        "arch": spec.name, "size": choices["size"], "seed": recipe.seed, "stage": choices["stage"],
        "description": spec.description, "distribution": spec.distribution,
        "config": config_to_dict(config), "config_hash": chash,
        "budget": budget.text, "budget_kind": budget.kind,
        "budget_flops": budget.amount if budget.kind == "flops" else None,
        "budget_tokens": int(budget.amount) if budget.kind == "tokens" else None,
        "params_total": params_total, "params_active": params_active,
        "corpus_spec": choices["corpus"],
        "corpus": {**corpus.describe(), **({"python": python_tag()} if choices["corpus"] == "stdlib-code" else {}),
                   **getattr(data, "describe", dict)()},
        **({"init_from": choices["init_from"]} if choices["init_from"] else {}),
        "tokenizer": tok_info, "training": {**recipe.as_dict(), "world_size": accelerator.num_processes,
                     "save_every": save_every, "eval_every": eval_every},
        "versions": rundir.versions((spec.distribution,) if spec.distribution else ()),
        "contract_version": CONTRACT_VERSION,
        "git_sha": rundir.git_sha(), "hardware": rundir.hardware(),
    })
    info.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def record(status: str, **extra) -> dict:
        for stale in ("error", "interrupted_by"):  # from an earlier session of a resumed run
            info.pop(stale, None)
        tps = ctx.tokens_per_step
        fps = meter.flops_per_step
        if "flop_shares" not in info and meter.steps:
            # once per run, after the first step (a resumed model has its artifacts back by then)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                shares = model.flop_shares(ctx.batches(0)[0])
            if shares:
                info["flop_shares"] = {k: round(float(v), 6) for k, v in shares.items()}
        if ctx.data is not data and callable(getattr(ctx.data, "describe", None)):
            info["stage_data"] = ctx.data.describe()  # a stage runner trains on its own data
        info.update({
            "status": status, "achieved_flops": meter.flops, "tokens": meter.tokens, "steps": meter.steps,
            "flops_uncounted_ops": sorted(meter.uncounted_ops), "flops_declared_ops": sorted(meter.declared_ops),
            "flops_per_step": fps, "flops_per_token": (meter.flops / meter.tokens) if meter.tokens else ((fps / tps) if fps else None),
            "planned_steps": ctx.total_steps, "wall_seconds": round(ctx.elapsed, 3),
            "final_train_loss": ctx.last_loss if meter.steps else None,
            "val_loss": ctx.last_val.get("val_loss"), "val_bpb": ctx.last_val.get("val_bpb"), **extra,
        })
        if accelerator.is_main_process:
            rundir.write_info(out, info)
        return info

    def save_model_files(c: TrainContext) -> None:
        """After each checkpoint: publish weights, artifacts and exports at the top of RUN."""
        rundir.publish_model(out, model, config_to_dict(config))
        record("running")

    ctx.on_checkpoint = save_model_files

    handlers = _install_signal_handlers(ctx)
    runner = spec.stage_runner or shared_loop
    try:
        if recorded is None and previous is None and accelerator.is_main_process:
            save_tokenizer(tok, out)
        if recorded is None:
            record("running")
        runner(ctx)
    except BaseException as exc:
        started_fresh = recorded is None
        rolled_back = False
        if started_fresh and _stage_or_none(out) != (choices["stage"] or "") and accelerator.is_main_process:
            rolled_back = True
            try:
                _roll_back(out, previous, choices["stage"])  # nothing worth keeping was written
            except OSError:  # e.g. the disk that stopped the run is full: what a kill would leave
                pass
            if isinstance(exc, TrainingDiverged):
                exc.args = (f"{exc}; nothing was kept; start a new run with a lower --lr",)
        elif isinstance(exc, TrainingDiverged):
            _report_divergence(exc, record, out)
        if _write_errno(exc) is not None:
            raise TrainError(_write_failure(exc, out, rolled_back)) from None
        raise
    finally:
        _restore_signal_handlers(handlers)

    if ctx.stop_signal is not None:
        ctx.checkpoint()
        record("interrupted", interrupted_by=ctx.stop_signal)
        return info
    ctx.validate()
    ctx.checkpoint()
    return record("complete")


def _load_init(model, run: Path) -> None:
    """--init-from: RUN's final weights (strict) and artifacts replace the initialisation."""
    try:
        rundir.load_weights(model, run / rundir.WEIGHTS_FILE)
    except rundir.RunError as exc:
        raise TrainError(f"cannot start from {run}: {exc}") from None
    try:
        model.load_artifacts(run)
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot start from {run}: cannot load the model's artifacts: {exc}") from None


def _write_errno(exc: BaseException) -> Optional[int]:
    """The errno of a write that failed for lack of room or permission (disk full, quota, file
    size limit, read-only or failing disk), also when a library (safetensors) reports it as
    text; None for any other error."""
    import re

    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and type(exc).__name__ == "SafetensorError":
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    return code if code in WRITE_ERRNOS else None


def _write_failure(exc: BaseException, out: Path, rolled_back: bool) -> str:
    """One line for a session stopped by a failed write: what failed, what survived, the fix."""
    code = _write_errno(exc)
    fix = "free some space" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "fix that"
    if rolled_back:
        return f"cannot write to {out}: {os.strerror(code)}; nothing was kept; {fix} and start the run again"
    try:
        kept = ckpt_step(out)
    except CheckpointDamaged:
        kept = None
    keep = f"the last good checkpoint (step {kept}) is kept in {out}/state" if kept is not None else "no checkpoint was written"
    return f"cannot write to {out}: {os.strerror(code)}; {keep}; {fix} and continue with `hmst-bench train --resume --out {out}`"


def _stage_or_none(out: Path) -> Optional[str]:
    try:
        return checkpoint_stage(out)
    except CheckpointDamaged:
        return None


def _report_divergence(exc: TrainingDiverged, record, out: Path) -> None:
    try:
        record("failed", error=str(exc))
    except OSError:  # the run.json update is lost, not the checkpoint or the reason
        pass
    kept = ckpt_step(out)
    exc.args = (f"{exc}; " + (f"the last good checkpoint (step {kept}) is kept in {out}/state" if kept is not None else "no checkpoint was written")
                + "; start a new run with a lower --lr",)


def ckpt_step(out: Path) -> Optional[int]:
    state = read_trainer_state(out)
    return None if state is None else int(state["step"])


def checkpoint_stage(out: Path) -> Optional[str]:
    """The stage ("" for unstaged runs) of the checkpoint in `out`, or None without one."""
    state = read_trainer_state(out)
    return None if state is None else (state.get("stage") or "")


def _install_signal_handlers(ctx: TrainContext):
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit. A second SIGINT aborts at once."""
    previous = {}

    def handler(signum, frame):
        if ctx.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        ctx.stop_signal = signal.Signals(signum).name

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. called from a worker); no handlers then
            pass
    return previous


def _restore_signal_handlers(previous) -> None:
    for sig, h in previous.items():
        signal.signal(sig, h)


def default_out(arch: str, size: str, budget: str, seed: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe_budget = budget.replace("+", "").replace("/", "_")
    return Path(os.environ.get("HMST_BENCH_RUNS", "runs")) / f"{arch}-{size}-{safe_budget}-s{seed}-{stamp}"
