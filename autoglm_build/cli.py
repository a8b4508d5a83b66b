"""``autoglm-build``: thin commands that parse, call the library, and render.

Common options (-c, -w, --json, -v/-q, --dry-run) are accepted before the command (global) and
after it; the later one wins. Exit codes are listed in :mod:`autoglm_build.errors`.

A workdir carries its config (recorded in its manifest): without -c, a command on a workdir uses
it; a -c whose config differs from the file the workdir was built with is refused (exit 2; build
commands take --force to rebuild with it). See :func:`autoglm_build.workdir.resolve_target`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from autoglm_build import __version__
from autoglm_build.console import Reporter, print_json, stderr
from autoglm_build.errors import EXIT_INTERNAL, UserError

DEFAULT_CONFIG = Path("configs/autoglm-phone-tiny.yaml")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn AutoGLM-Phone-9B into verified TensorRT engines, and serve them.",
)


@dataclass(frozen=True)
class Options:
    config: Optional[Path] = None  # None: the workdir's recorded config, else DEFAULT_CONFIG
    workdir: Optional[Path] = None
    json: bool = False
    verbosity: int = 0
    dry_run: bool = False


ConfigOpt = typer.Option(None, "-c", "--config", help="Build config YAML \\[default: the workdir's recorded "
                         "config, else configs/autoglm-phone-tiny.yaml]")
WorkdirOpt = typer.Option(None, "-w", "--workdir", help="Artifacts and manifest \\[default: build/<config name>]")
JsonOpt = typer.Option(None, "--json", help="One JSON document on stdout; logs stay on stderr.")
VerboseOpt = typer.Option(None, "-v", "--verbose", help="More logs on stderr.")
QuietOpt = typer.Option(None, "-q", "--quiet", help="Errors only on stderr.")
DryRunOpt = typer.Option(None, "--dry-run", help="Print the plan (modules, sizes, cache) and do nothing.")
CheckpointOpt = typer.Option(None, "--checkpoint", help="Local safetensors checkpoint directory.")
ForceOpt = typer.Option(False, "--force", help="Rerun stages even when cached.")
ModuleOpt = typer.Option(None, "-m", "--module", help="Only these modules (repeatable).")


def _print_version(value: bool) -> None:
    """``--version``: eager, so it answers before Click asks for a command."""
    if value:
        print(__version__)
        raise typer.Exit(0)


@app.callback()
def main_callback(
    ctx: typer.Context,
    config: Optional[Path] = ConfigOpt,
    workdir: Optional[Path] = WorkdirOpt,
    json_out: Optional[bool] = JsonOpt,
    verbose: Optional[bool] = VerboseOpt,
    quiet: Optional[bool] = QuietOpt,
    dry_run: Optional[bool] = DryRunOpt,
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the version and exit."),
) -> None:
    ctx.obj = _merge(Options(), config, workdir, json_out, verbose, quiet, dry_run)


def _merge(base: Options, config, workdir, json_out, verbose, quiet, dry_run) -> Options:
    changes = {}
    if config is not None:
        changes["config"] = config
    if workdir is not None:
        changes["workdir"] = workdir
    if json_out is not None:
        changes["json"] = json_out
    if dry_run is not None:
        changes["dry_run"] = dry_run
    if verbose:
        changes["verbosity"] = 1
    if quiet:
        changes["verbosity"] = -1
    return replace(base, **changes)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """User-fixable errors: one red line (and a hint) on stderr, the documented exit code."""
    try:
        yield
    except UserError as exc:
        stderr.print(f"[bold red]error:[/bold red] {exc.message}", highlight=False, soft_wrap=True)
        if exc.hint:
            stderr.print(f"[dim]hint: {exc.hint}[/dim]", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


# ------------------------------------------------------------------------------------------------
# Commands


@app.command()
def export(
    ctx: typer.Context,
    module: Optional[List[str]] = ModuleOpt,
    checkpoint: Optional[Path] = CheckpointOpt,
    force: bool = ForceOpt,
    config: Optional[Path] = ConfigOpt,
    workdir: Optional[Path] = WorkdirOpt,
    json_out: Optional[bool] = JsonOpt,
    verbose: Optional[bool] = VerboseOpt,
    quiet: Optional[bool] = QuietOpt,
    dry_run: Optional[bool] = DryRunOpt,
) -> None:
    """Export each module to ONNX (dynamic batch 1..8) and validate it against PyTorch."""
    opts = _merge(ctx.obj or Options(), config, workdir, json_out, verbose, quiet, dry_run)
    with user_errors():
        _build(opts, ["export"], module, checkpoint, force)


@app.command()
def run(
    ctx: typer.Context,
    module: Optional[List[str]] = ModuleOpt,
    checkpoint: Optional[Path] = CheckpointOpt,
    force: bool = ForceOpt,
    config: Optional[Path] = ConfigOpt,
    workdir: Optional[Path] = WorkdirOpt,
    json_out: Optional[bool] = JsonOpt,
    verbose: Optional[bool] = VerboseOpt,
    quiet: Optional[bool] = QuietOpt,
    dry_run: Optional[bool] = DryRunOpt,
) -> None:
    """Run every CPU stage (export, optimize, samples, calibrate int8 and fp16), skipping what is cached."""
    opts = _merge(ctx.obj or Options(), config, workdir, json_out, verbose, quiet, dry_run)
    with user_errors():
        _build(opts, RUN_STAGES, module, checkpoint, force)


@app.command()
def optimize(
    ctx: typer.Context,
    module: Optional[List[str]] = ModuleOpt,
    force: bool = ForceOpt,
    config: Optional[Path] = ConfigOpt,
    workdir: Optional[Path] = WorkdirOpt,
    json_out: Optional[bool] = JsonOpt,
    verbose: Optional[bool] = VerboseOpt,
    quiet: Optional[bool] = QuietOpt,
    dry_run: Optional[bool] = DryRunOpt,
) -> None:
    """Clean up and fuse each exported graph (standard ONNX ops only), checked equal in ONNX Runtime."""
    opts = _merge(ctx.obj or Options(), config, workdir, json_out, verbose, quiet, dry_run)
    with user_errors():
        _build(opts, ["optimize"], module, None, force)


@app.command()
def calibrate(
    ctx: typer.Context,
    int8: bool = typer.Option(False, "--int8", help="INT8 Q/DQ graph with the FP16 policy islands."),
    fp16: bool = typer.Option(False, "--fp16", help="FP16 graph (I/O FP32). Neither flag: both."),
    method: Optional[str] = typer.Option(None, "--method", help="entropy | minmax | percentile"),
    batches: Optional[int] = typer.Option(None, "--batches", min=1, help="Calibration batches per module."),
    target_cosine: Optional[float] = typer.Option(
        None, "--target-cosine", min=0.0, max=1.0, help="Move the most sensitive layers to FP16 until this holds."),
    module: Optional[List[str]] = ModuleOpt,
    force: bool = ForceOpt,
    config: Optional[Path] = ConfigOpt,
    workdir: Optional[Path] = WorkdirOpt,
    json_out: Optional[bool] = JsonOpt,
    verbose: Optional[bool] = VerboseOpt,
    quiet: Optional[bool] = QuietOpt,
    dry_run: Optional[bool] = DryRunOpt,
) -> None:
    """Mixed precision in the graph: INT8 Q/DQ (+FP16 islands) and/or FP16, on real calibration data."""
    opts = _merge(ctx.obj or Options(), config, workdir, json_out, verbose, quiet, dry_run)
    stages = [s for s, on in (("calibrate-int8", int8), ("calibrate-fp16", fp16)) if on]
    # settings of the build's config: recorded in the workdir's config, so later commands keep them
    settings = {k: v for k, v in (("method", method), ("batches", batches), ("target_cosine", target_cosine))
                if v is not None}
    with user_errors():
        if method is not None and method not in ("entropy", "minmax", "percentile"):
            raise UserError(f"--method: '{method}' is not one of entropy, minmax, percentile")
        _build(opts, stages or ["calibrate-int8", "calibrate-fp16"], module, None, force,
               {"calibrate": settings} if settings else None)


@app.command()
def engine(
    ctx: typer.Context,
    precision: str = typer.Option("fp16", "--precision", help="fp16 | int8 | fp32"),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", min=1, help="Profile max batch \\[engine.max_batch]"),
    opt_batch: Optional[int] = typer.Option(None, "--opt-batch", min=1, help="Profile opt batch \\[engine.opt_batch]"),
    module: Optional[List[str]] = ModuleOpt,
    force: bool = ForceOpt,
    config: Optional[Path] = ConfigOpt,
    workdir: Optional[Path] = WorkdirOpt,
    json_out: Optional[bool] = JsonOpt,
    verbose: Optional[bool] = VerboseOpt,
    quiet: Optional[bool] = QuietOpt,
) -> None:
    """Build a TensorRT engine per module ([1, opt, max] batch profiles); needs TensorRT and a GPU (exit 4)."""
    opts = _merge(ctx.obj or Options(), config, workdir, json_out, verbose, quiet, None)
    with user_errors():
        if precision not in ("fp16", "int8", "fp32"):
            raise UserError(f"--precision: '{precision}' is not one of fp16, int8, fp32")
        _build(opts, [f"engine-{precision}"], module, None, force, engine_batches=(max_batch, opt_batch))


@app.command()
def verify(
    ctx: typer.Context,
    precision: Optional[List[str]] = typer.Option(None, "--precision", help="fp16 | int8 (repeatable) \\[both]"),
    strict: bool = typer.Option(False, "--strict", help="Exit 3 when anything is out of tolerance."),
    backend: str = typer.Option(
        "auto", "--backend", help="onnxruntime: precision graphs vs FP32 under calibrate.gate; tensorrt: engines "
        "vs their own graphs; auto: both (engines where TensorRT is installed)"),
    module: Optional[List[str]] = ModuleOpt,
    config: Optional[Path] = ConfigOpt,
    workdir: Optional[Path] = WorkdirOpt,
    json_out: Optional[bool] = JsonOpt,
    verbose: Optional[bool] = VerboseOpt,
    quiet: Optional[bool] = QuietOpt,
) -> None:
    """Precision graphs vs the FP32 graph (accuracy gate) and engines vs their own graphs (tight
    tolerance), on real samples at the config's export.batch_sizes; the rows are stored in the manifest."""
    opts = _merge(ctx.obj or Options(), config, workdir, json_out, verbose, quiet, None)
    with user_errors():
        from autoglm_build.errors import AccuracyError
        from autoglm_build.render import render_verify
        from autoglm_build.verify import verify as run_verify

        cfg, names, target = _target(opts, module)
        precisions = precision or ["fp16", "int8"]
        for p in precisions:
            if p not in ("fp16", "int8", "fp32"):
                raise UserError(f"--precision: '{p}' is not one of fp16, int8, fp32")
        backends = {"auto": ("onnxruntime", "tensorrt"), "onnxruntime": ("onnxruntime",),
                    "tensorrt": ("tensorrt",)}.get(backend)
        if backends is None:
            raise UserError(f"--backend: '{backend}' is not one of auto, onnxruntime, tensorrt")
        reporter = Reporter(opts.verbosity)
        with reporter.task("verify") as status:
            report = run_verify(cfg, target, names, precisions, status, backends)
        for note in report["notes"]:
            reporter.warn(note)
        print_json(report) if opts.json else render_verify(report)
        if strict and not report["passed"]:
            bad = sum(not r["passed"] for r in report["rows"])
            raise AccuracyError(f"verify: {bad} of {len(report['rows'])} checks out of tolerance")


@app.command()
def inspect(
    ctx: typer.Context,
    config: Optional[Path] = ConfigOpt,
    workdir: Optional[Path] = WorkdirOpt,
    json_out: Optional[bool] = JsonOpt,
    verbose: Optional[bool] = VerboseOpt,
    quiet: Optional[bool] = QuietOpt,
) -> None:
    """Show what a workdir holds: artifacts (checked against their hashes) and stage records."""
    opts = _merge(ctx.obj or Options(), config, workdir, json_out, verbose, quiet, None)
    with user_errors():
        from autoglm_build.inspect import inspect_workdir
        from autoglm_build.render import render_inspect

        report = inspect_workdir(_workdir(opts))
        print_json(report) if opts.json else render_inspect(report)


@app.command()
def bench(
    ctx: typer.Context,
    module: Optional[List[str]] = ModuleOpt,
    batches: Optional[str] = typer.Option(
        None, "--batches", help="Comma-separated batch sizes \\[export.batch_sizes, within engine.max_batch]"),
    backends: str = typer.Option("tensorrt,torch,onnxruntime", "--backends",
                                 help="Any of tensorrt (trt), torch, onnxruntime (ort)"),
    precision: Optional[List[str]] = typer.Option(None, "--precision",
                                                  help="Engine precisions (repeatable) \\[fp16, int8]"),
    prompt: int = typer.Option(512, "--prompt", min=1, help="Decoder prefill length (time to first token)."),
    past: int = typer.Option(512, "--past", min=1, help="Cache length of the timed decode step."),
    prefix: int = typer.Option(0, "--prefix", min=0, help="Also time the prefill of --prompt new tokens after a "
                               "cached prefix of this many (the phone agent's step: 3,300 after 3,000)."),
    min_time: float = typer.Option(1.0, "--min-time", min=0.0, help="Seconds of timed iterations per case."),
    extrapolate_to: Optional[Path] = typer.Option(
        None, "--extrapolate-to", help="A deeper config of the same widths (the 9B beside its 2-layer slice): "
        "each row also scaled to its depth by bytes (decode) or FLOPs (prefill, images)."),
    config: Optional[Path] = ConfigOpt,
    workdir: Optional[Path] = WorkdirOpt,
    json_out: Optional[bool] = JsonOpt,
    verbose: Optional[bool] = VerboseOpt,
    quiet: Optional[bool] = QuietOpt,
) -> None:
    """Latency p50/p90/p99 and throughput: engines vs PyTorch eager vs ONNX Runtime, with hardware floors."""
    opts = _merge(ctx.obj or Options(), config, workdir, json_out, verbose, quiet, None)
    with user_errors():
        from autoglm_build.bench import bench as run_bench
        from autoglm_build.render import render_bench

        cfg, names, target = _target(opts, module)
        sizes = (_batch_sizes(batches, cfg.engine.max_batch) if batches is not None
                 else sorted({min(b, cfg.engine.max_batch) for b in cfg.export.batch_sizes}))
        full = _extrapolation_config(extrapolate_to)
        reporter = Reporter(opts.verbosity)
        with reporter.task("bench") as status:
            report = run_bench(cfg, target, names, sizes,
                               [b.strip() for b in backends.split(",") if b.strip()], precision or ["fp16", "int8"],
                               prompt, past, min_time=min_time, status=status, prefix=prefix, extrapolate_to=full)
        for note in report["notes"]:
            reporter.warn(note)
        print_json(report) if opts.json else render_bench(report)


@app.command()
def serve(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, "--host", help="Bind address \\[serve.host: 127.0.0.1]"),
    port: Optional[int] = typer.Option(None, "--port", min=0, max=65535, help="Port \\[serve.port: 8000]"),
    backend: str = typer.Option("auto", "--backend", help="auto | tensorrt | onnxruntime"),
    precision: Optional[str] = typer.Option(None, "--precision",
                                            help="fp16 | int8 | fp32 \\[tensorrt: fp16, onnxruntime: fp32]"),
    api_key: Optional[str] = typer.Option(None, "--api-key",
                                          help="Require this bearer key \\[env AUTOGLM_BUILD_API_KEY]"),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", min=1,
                                            help="Decoder rows at once \\[serve.max_batch]"),
    queue_size: Optional[int] = typer.Option(None, "--queue-size", min=0, help="Waiting requests \\[serve.queue_size]"),
    devices: Optional[str] = typer.Option(None, "--devices", help="GPUs for the decoder's stages, e.g. 0,1: stage i "
                                          "of N on GPU list\\[i*len/N], encoders on the first (TensorRT; pipeline "
                                          "parallel) \\[serve.devices; default: the current GPU]"),
    config: Optional[Path] = ConfigOpt,
    workdir: Optional[Path] = WorkdirOpt,
    verbose: Optional[bool] = VerboseOpt,
    quiet: Optional[bool] = QuietOpt,
) -> None:
    """OpenAI-compatible server (/v1/chat/completions, /v1/completions) over a build's engines or graphs."""
    opts = _merge(ctx.obj or Options(), config, workdir, None, verbose, quiet, None)
    with user_errors():
        from autoglm_build.runtime.device import parse_devices
        from autoglm_build.serve.server import build_state
        from autoglm_build.serve.server import serve as run_server

        if precision is not None and precision not in ("fp16", "int8", "fp32"):
            raise UserError(f"--precision: '{precision}' is not one of fp16, int8, fp32")
        placed = parse_devices(devices) if devices is not None else None
        cfg, _, target = _target(opts)
        state = build_state(cfg, target, backend, precision, api_key, max_batch, queue_size, placed)
        level = {-1: "warning", 0: "info", 1: "debug"}[opts.verbosity]
        run_server(state, host or cfg.serve.host, cfg.serve.port if port is None else port, level,
                   announce=lambda line: stderr.print(line, highlight=False, soft_wrap=True))


# ------------------------------------------------------------------------------------------------
# Shared plumbing


# What `run` does; engines join when this machine has TensorRT (`engine` and `verify` say why not).
RUN_STAGES = ["export", "optimize", "samples", "calibrate-int8", "calibrate-fp16"]


def _export_stage(checkpoint: Optional[Path]):
    from autoglm_build.stages.export import ExportStage  # imports torch only when it runs

    return ExportStage(checkpoint=checkpoint)


def _optimize_stage():
    from autoglm_build.stages.optimize import OptimizeStage

    return OptimizeStage()


def _target(opts: Options, modules: Optional[List[str]] = None) -> tuple:
    """``(cfg, module names, workdir)`` a read-only command (verify, bench, serve) works on: the
    workdir's own config unless -c is given (:func:`_resolve`), every module of it unless named."""
    from autoglm_build.modules import registry

    target = _resolve(opts, rebuild_hint="rebuild it: autoglm-build run -c {config} -w {workdir} --force")
    names = [registry.get(m).name for m in modules] if modules else list(target.cfg.modules)
    return target.cfg, names, target.workdir


def _resolve(opts: Options, overrides: Optional[dict] = None, force: bool = False,
             rebuild_hint: str = "pass --force to rebuild it with {config}"):
    """The config and workdir of a command (:func:`autoglm_build.workdir.resolve_target`)."""
    from autoglm_build.workdir import resolve_target

    return resolve_target(opts.config, opts.workdir, DEFAULT_CONFIG, overrides, force, rebuild_hint)


def _extrapolation_config(path: Optional[Path]):
    """``bench --extrapolate-to``: a config of the same widths, loaded and checked like ``-c``."""
    if path is None:
        return None
    from autoglm_build.config import load_config

    return load_config(path)


def _workdir(opts: Options) -> Path:
    from autoglm_build.workdir import check_workdir

    if opts.workdir is not None:
        return check_workdir(opts.workdir)
    from autoglm_build.config import load_config

    return check_workdir(Path("build") / load_config(opts.config or DEFAULT_CONFIG).name)


def _batch_sizes(text: str, max_batch: int) -> List[int]:
    """``--batches``: comma-separated sizes, each within the engines' batch profile ``1..max_batch``."""
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--batches: '{text}' is not a comma-separated list of integers") from None
    if not sizes:
        raise UserError("--batches: no batch size given")
    for size in sizes:
        if not 1 <= size <= max_batch:
            raise UserError(f"--batches: {size} is outside the batch profile 1..{max_batch} (engine.max_batch)")
    return sizes


def _build(opts: Options, stage_names: List[str], modules: Optional[List[str]], checkpoint: Optional[Path],
           force: bool, overrides: Optional[dict] = None, engine_batches: tuple = (None, None)) -> None:
    """Run ``stage_names``; ``overrides`` are config settings from the command line (``--checkpoint``,
    calibrate's ``--method``, ``--batches``, ``--target-cosine``): they become part of the config the
    workdir records."""
    from autoglm_build.modules import registry
    from autoglm_build.pipeline import Pipeline
    from autoglm_build.render import render_outcomes, render_plan
    from autoglm_build.stages.calibrate import CalibrateStage
    from autoglm_build.stages.engine import EngineStage
    from autoglm_build.stages.samples import SamplesStage

    overrides = dict(overrides or {}, **({"checkpoint": str(checkpoint.resolve())} if checkpoint else {}))
    target = _resolve(opts, overrides, force)
    cfg, workdir = target.cfg, target.workdir
    names = [registry.get(m).name for m in modules] if modules else list(cfg.modules)
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else None
    stages = {
        "export": lambda: _export_stage(ckpt),
        "optimize": _optimize_stage,
        "samples": SamplesStage,
        "calibrate-int8": lambda: CalibrateStage("int8"),
        "calibrate-fp16": lambda: CalibrateStage("fp16"),
        **{f"engine-{p}": (lambda p=p: EngineStage(p, *engine_batches)) for p in ("fp16", "int8", "fp32")},
    }
    reporter = Reporter(opts.verbosity)
    if target.changed:
        reporter.warn(f"{target.config_path}: changed since {workdir}'s last build: {', '.join(target.changed)}")
    pipeline = Pipeline(cfg, workdir, [stages[s]() for s in stage_names], names, force=force,
                        reporter=reporter, config_path=target.config_path)
    if opts.dry_run:
        from autoglm_build.plan import build_plan

        plan = dict(build_plan(cfg, names, pipeline.plan()), workdir=str(workdir), config_path=target.config_path)
        print_json(plan) if opts.json else render_plan(plan)
        return
    outcomes = pipeline.run()
    if opts.json:
        print_json({"config": cfg.name, "workdir": str(workdir), "outcomes": [o.as_dict() for o in outcomes]})
    else:
        render_outcomes(outcomes, workdir)


def main() -> None:
    """Console-script entry point."""
    if os.environ.get("AUTOGLM_BUILD_DEBUG"):
        app()
        return
    try:
        app()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        stderr.print("[red]interrupted[/red]")
        raise SystemExit(130) from None
    except Exception:  # a bug: keep the traceback
        stderr.print_exception(show_locals=False)
        raise SystemExit(EXIT_INTERNAL) from None


if __name__ == "__main__":
    main()
