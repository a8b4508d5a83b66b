"""Stage ``export``: a modality module from PyTorch to ONNX, validated against PyTorch.

For each module: build it (seeded random weights, or a local safetensors checkpoint streamed in
tensor by tensor), run PyTorch on every validation case and keep its outputs, export with a dynamic
batch axis (and its sequence axes) at the configured opset, free the torch module, store weights as
external data when they pass ``export.large_model_bytes`` (protobuf cannot hold 2 GB), then run the
ONNX in ONNX Runtime at every configured batch size and length against PyTorch's kept outputs. The
files are written in a temp directory inside the workdir and moved into place only after the
validation passed: a failed or interrupted export leaves no half-written ONNX behind.

Memory: one FP32 copy of the module's weights at a time (the torch module, then the ONNX files
ONNX Runtime maps), plus the exporter's own copies of its largest weight while it traces (about 3x
that tensor); the stage records its peak RSS as ``metrics.peak_rss_mib`` (docs/decisions.md).

Exporter: torch's TorchScript-based ``torch.onnx.export(dynamo=False)``. It emits opset <= 17
natively, which TensorRT 8.5 needs; the dynamo exporter starts at opset 18 and its down-conversion
fails on these graphs (docs/decisions.md).
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from autoglm_build.config import BuildConfig
from autoglm_build.errors import AccuracyError
from autoglm_build.memory import peak_rss_mib, reset_peak
from autoglm_build.modules import registry
from autoglm_build.modules.base import Case, ModuleSpec, Patch
from autoglm_build.onnx_io import move_into_place, ort_options, save_exported
from autoglm_build.stages.base import Stage, StageContext, StageResult
from autoglm_build.validate import Runner, compare_cases, ort_runner, summarize, torch_runner

ONNX_DIR = "onnx"


class ExportStage(Stage):
    """``export``: PyTorch -> ONNX per module, validated with ONNX Runtime against PyTorch.

    Args:
        checkpoint: A local safetensors checkpoint directory, or None for seeded random weights.
    """

    name = "export"
    version = 1
    tools = ("torch", "transformers", "onnx", "onnxruntime")

    def __init__(self, checkpoint: Optional[Path] = None) -> None:
        self.checkpoint_dir = Path(checkpoint) if checkpoint else None
        self._checkpoint = None

    def checkpoint(self, cfg: BuildConfig):
        """The checkpoint, opened (headers read, config.json checked against ``cfg``) once."""
        if self.checkpoint_dir is not None and self._checkpoint is None:
            from autoglm_build.weights import Checkpoint

            checkpoint = Checkpoint(self.checkpoint_dir)
            checkpoint.check_config(cfg)
            self._checkpoint = checkpoint
        return self._checkpoint

    def fingerprint_data(self, ctx: StageContext, module: str) -> Dict[str, Any]:
        data = registry.get(module).fingerprint_data(ctx.cfg)
        checkpoint = self.checkpoint(ctx.cfg)
        data["checkpoint"] = checkpoint.fingerprint() if checkpoint else None
        return data

    def __call__(self, ctx: StageContext, module: str) -> StageResult:
        spec = registry.get(module)
        reset_peak()
        ctx.status("building")
        torch_module, params, warns = self.build_module(ctx, spec)
        cases = list(spec.cases(ctx.cfg, np.random.default_rng(1234)))
        ctx.status(f"running PyTorch on {len(cases)} validation cases")
        reference = recorded_reference(spec, ctx.cfg, torch_module, cases)
        final_dir = ctx.workdir / ONNX_DIR
        with tempfile.TemporaryDirectory(dir=ctx.workdir, prefix=f".export-{module}-") as tmp:
            ctx.status("exporting")
            t0 = time.perf_counter()
            raw = trace_onnx(ctx, spec, torch_module, Path(tmp))
            # From here the graph holds the weights: the torch module goes before the graph is read
            # back and before ONNX Runtime loads it, so no two FP32 copies are alive at once.
            del torch_module
            gc.collect()
            files = finish_onnx(ctx, spec, raw, Path(tmp))
            export_s = time.perf_counter() - t0
            metrics = validate_onnx(ctx, spec, reference, files[0], cases)
            metrics["export_s"] = round(export_s, 3)
            metrics["peak_rss_mib"] = peak_rss_mib()
            if not metrics["passed"]:
                raise export_accuracy_error(module, metrics)
            outputs = move_into_place(files, final_dir, module, "onnx")
        return StageResult(outputs=outputs, params=params, metrics=metrics, warnings=warns)

    def build_module(self, ctx: StageContext, spec: ModuleSpec) -> Tuple[Any, Dict[str, Any], List[str]]:
        """The torch module with its weights, the params to record, and warnings.

        From a checkpoint the module is built with empty parameters and each one is read from the
        checkpoint (:mod:`autoglm_build.weights`): one FP32 copy of the weights, never a random init
        beside the loaded ones. Without one, the seeded random init as ever.
        """
        checkpoint = self.checkpoint(ctx.cfg)
        if checkpoint is None:
            module = spec.build(ctx.cfg)
        else:
            from autoglm_build.weights import empty_parameters

            with empty_parameters():
                module = spec.build(ctx.cfg)
        params: Dict[str, Any] = {
            "parameters": sum(p.numel() for p in module.parameters()),
            "opset": ctx.cfg.export.opset,
            "weights": "random",
            "seed": spec.seed(ctx.cfg),
        }
        warns: List[str] = []
        if checkpoint is not None:
            ctx.status("loading checkpoint")
            report = checkpoint.load_into(module, spec.weight_prefixes, spec.name, spec.checkpoint_ignore)
            params.update(weights=str(self.checkpoint_dir), tensors_loaded=report.loaded, prefixes=report.prefixes)
            params.pop("seed")
            if report.unused:
                warns.append(
                    f"{len(report.unused)} checkpoint tensors under {sorted(set(report.prefixes.values()))} "
                    f"unused by this config (e.g. {report.unused[0]})"
                )
        return module, params, warns


def trace_onnx(ctx: StageContext, spec: ModuleSpec, module: Any, workdir: Path) -> Path:
    """The exporter's own graph of ``module`` at ``workdir/raw/<name>.onnx`` (weights beside it when
    large), before it is stamped and saved as the build keeps it (:func:`finish_onnx`)."""
    import torch

    cfg = ctx.cfg
    raw = workdir / "raw" / f"{spec.name}.onnx"
    raw.parent.mkdir()
    example = spec.export_inputs(cfg)
    names = spec.input_names(cfg)
    with patched(spec.export_patches()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(torch.from_numpy(example[n]) for n in names),
            str(raw),
            dynamo=False,
            opset_version=cfg.export.opset,
            input_names=names,
            output_names=spec.output_names(cfg),
            dynamic_axes=spec.dynamic_axes(cfg),
            do_constant_folding=True,
        )
    _release_exporter_constants()
    return raw


def _release_exporter_constants() -> None:
    """Free the constants torch's TorchScript exporter keeps after an export.

    Its shape inference caches the value of every constant it saw (a process-wide map, cleared when
    the next export starts): at full width the LM head's 2.4 GB stayed alive after the module was
    freed, until the next module's export. Exporting a one-weight module clears the map.
    """
    import io

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Linear(1, 1), (torch.zeros(1, 1),), io.BytesIO(), dynamo=False)


def finish_onnx(ctx: StageContext, spec: ModuleSpec, raw: Path, workdir: Path) -> List[Path]:
    """The raw export stamped and saved to ``workdir/<name>.onnx`` (+ one ``.onnx.data``), one weight
    in memory at a time (:func:`~autoglm_build.onnx_io.save_exported`); the raw files are removed.
    Returns the files."""
    import onnx

    out = workdir / f"{spec.name}.onnx"
    files = save_exported(raw, out, ctx.cfg.export.large_model_bytes, lambda model: _stamp(model, spec, ctx.cfg.name))
    shutil.rmtree(raw.parent)
    onnx.checker.check_model(str(out))
    return files


def recorded_reference(spec: ModuleSpec, cfg: BuildConfig, module: Any, cases: Sequence[Case]) -> Runner:
    """PyTorch's outputs on every step of ``cases``, computed now (each case's steps chained on the
    reference's own outputs, as :func:`~autoglm_build.validate.compare_cases` chains them) and
    replayed in that order: the module can be freed before ONNX Runtime loads the graph."""
    run = torch_runner(module, spec.input_names(cfg), spec.output_names(cfg))
    outputs = []
    for case in cases:
        carried: Dict[str, np.ndarray] = {}
        for step in case.steps:
            want = run({**step, **carried})
            outputs.append(want)
            if case.chain:
                carried = {case.chain[k]: v for k, v in want.items() if k in case.chain}
    replay = iter(outputs)
    return lambda feed: next(replay)


def validate_onnx(ctx: StageContext, spec: ModuleSpec, reference: Runner, path: Path,
                  cases: Sequence[Case]) -> Dict[str, Any]:
    """ONNX Runtime vs PyTorch's recorded outputs (:func:`recorded_reference`) on ``cases``; the
    manifest's metrics."""
    import onnxruntime as ort

    cfg = ctx.cfg
    opts = ort_options()
    # Without prepacking ONNX Runtime maps the external weights and reads them in place; prepacked, it
    # copies every MatMul weight into its own layout (1.6x the decoder's FP32 weights at load).
    opts.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    outputs = spec.output_names(cfg)
    ctx.status(f"validating 0/{len(cases)} cases vs PyTorch")
    rows = compare_cases(
        spec.name,
        cases,
        run=ort_runner(session, outputs),
        reference=reference,
        tolerance=spec.tolerance(cfg),
        progress=lambda done: ctx.status(f"validating {done}/{len(cases)} cases vs PyTorch"),
    )
    return summarize(rows)


def export_accuracy_error(module: str, metrics: Dict[str, Any]) -> AccuracyError:
    worst = max((r for r in metrics["rows"] if not r["passed"]), key=lambda r: r["max_abs"])
    err = AccuracyError(
        f"{module}: ONNX Runtime differs from PyTorch on '{worst['output']}' ({worst['case']}, batch "
        f"{worst['batch']}): max abs {worst['max_abs']:.3g} > atol {worst['atol']:g} + rtol {worst['rtol']:g} "
        f"x max|ref| (max rel {worst['max_rel']:.3g})",
        hint=f"raise export.tolerances.{module} only if the difference is understood",
    )
    err.metrics = metrics  # type: ignore[attr-defined]
    return err


@contextlib.contextmanager
def patched(patches: Sequence[Patch]) -> Iterator[None]:
    """Apply export patches, restoring the originals afterwards (also on error)."""
    saved = [(p, getattr(p.owner, p.attr)) for p in patches]
    try:
        for p in patches:
            setattr(p.owner, p.attr, p.value)
        yield
    finally:
        for p, original in reversed(saved):
            setattr(p.owner, p.attr, original)


def _stamp(model: Any, spec: ModuleSpec, config_name: str) -> None:
    from autoglm_build import __version__

    for key, value in {
        "autoglm_build.version": __version__,
        "autoglm_build.module": spec.name,
        "autoglm_build.config": config_name,
    }.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    model.producer_name = "autoglm-build"
    model.producer_version = __version__
