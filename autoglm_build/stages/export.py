"""Stage ``export``: a modality module from PyTorch to ONNX, validated against PyTorch.

For each module: build it (seeded random weights, or a local safetensors checkpoint), export with
a dynamic batch axis (and its sequence axes) at the configured opset, store weights as external
data when they pass ``export.large_model_bytes`` (protobuf cannot hold 2 GB), then run the ONNX in
ONNX Runtime at every configured batch size and length against PyTorch on the same inputs. The
files are written in a temp directory inside the workdir and moved into place only after the
validation passed: a failed or interrupted export leaves no half-written ONNX behind.

Exporter: torch's TorchScript-based ``torch.onnx.export(dynamo=False)``. It emits opset <= 17
natively, which TensorRT 8.5 needs; the dynamo exporter starts at opset 18 and its down-conversion
fails on these graphs (docs/decisions.md).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from autoglm_build.config import BuildConfig
from autoglm_build.errors import AccuracyError
from autoglm_build.modules import registry
from autoglm_build.modules.base import ModuleSpec, Patch
from autoglm_build.onnx_io import move_into_place, save_model
from autoglm_build.stages.base import Stage, StageContext, StageResult
from autoglm_build.validate import compare_cases, ort_runner, summarize, torch_runner

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
        ctx.status("building")
        torch_module, params, warns = self.build_module(ctx, spec)
        final_dir = ctx.workdir / ONNX_DIR
        with tempfile.TemporaryDirectory(dir=ctx.workdir, prefix=f".export-{module}-") as tmp:
            ctx.status("exporting")
            t0 = time.perf_counter()
            files = export_onnx(ctx, spec, torch_module, Path(tmp))
            export_s = time.perf_counter() - t0
            metrics = validate_onnx(ctx, spec, torch_module, files[0])
            metrics["export_s"] = round(export_s, 3)
            if not metrics["passed"]:
                raise export_accuracy_error(module, metrics)
            outputs = move_into_place(files, final_dir, module, "onnx")
        return StageResult(outputs=outputs, params=params, metrics=metrics, warnings=warns)

    def build_module(self, ctx: StageContext, spec: ModuleSpec) -> Tuple[Any, Dict[str, Any], List[str]]:
        """The torch module with its weights, the params to record, and warnings."""
        module = spec.build(ctx.cfg)
        params: Dict[str, Any] = {
            "parameters": sum(p.numel() for p in module.parameters()),
            "opset": ctx.cfg.export.opset,
            "weights": "random",
            "seed": spec.seed(ctx.cfg),
        }
        warns: List[str] = []
        checkpoint = self.checkpoint(ctx.cfg)
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


def export_onnx(ctx: StageContext, spec: ModuleSpec, module: Any, workdir: Path) -> List[Path]:
    """Export ``module`` to ``workdir/<name>.onnx`` (+ ``.onnx.data`` when large); returns the files."""
    import onnx
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
    model = onnx.load(str(raw), load_external_data=True)
    shutil.rmtree(raw.parent)
    _stamp(model, spec, cfg.name)
    out = workdir / f"{spec.name}.onnx"
    files = save_model(model, out, cfg.export.large_model_bytes)
    del model
    onnx.checker.check_model(str(out))
    return files


def validate_onnx(ctx: StageContext, spec: ModuleSpec, module: Any, path: Path) -> Dict[str, Any]:
    """ONNX Runtime vs PyTorch on every validation case; the manifest's metrics."""
    import onnxruntime as ort

    cfg = ctx.cfg
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    outputs = spec.output_names(cfg)
    cases = list(spec.cases(cfg, np.random.default_rng(1234)))
    ctx.status(f"validating 0/{len(cases)} cases vs PyTorch")
    rows = compare_cases(
        spec.name,
        cases,
        run=ort_runner(session, outputs),
        reference=torch_runner(module, spec.input_names(cfg), outputs),
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
