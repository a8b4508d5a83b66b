"""Stage ``optimize``: cleanup and fusions into standard ONNX ops TensorRT parses.

Input: the module's exported FP32 graph. Optionally raise the opset (``optimize.opset``; opsets
only go up, and upgrades are what onnx's version converter does reliably), then apply the
configured rewrites in order (one class per file in :mod:`autoglm_build.rewrites`). A fusion whose
standard op needs a newer opset than the graph's is skipped and says why. The result must compute
what the input computes: both run in ONNX Runtime on the module's validation cases (batch 1, 4,
8) within ``optimize.tolerance`` (float rounding), or the stage fails with the numbers.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Dict

import numpy as np

from autoglm_build.errors import AccuracyError
from autoglm_build.modules import registry
from autoglm_build.onnx_io import move_into_place, ort_options, save_model
from autoglm_build.rewrites import REWRITES
from autoglm_build.rewrites.base import opset_of
from autoglm_build.stages.base import Stage, StageContext, StageResult
from autoglm_build.validate import compare_cases, ort_runner, summarize

OPTIMIZED_DIR = "optimized"


class OptimizeStage(Stage):
    """``optimize``: FP32 graph -> cleaned, fused FP32 graph, checked equal in ONNX Runtime."""

    name = "optimize"
    version = 1
    tools = ("onnx", "onnxslim", "onnx-graphsurgeon", "onnxruntime")

    def fingerprint_data(self, ctx: StageContext, module: str) -> Dict[str, Any]:
        arts = ctx.manifest.artifacts_of("export", module)
        return {"module": module, "inputs": [a.sha256 for a in arts], "settings": ctx.cfg.section("optimize")}

    def __call__(self, ctx: StageContext, module: str) -> StageResult:
        import onnx

        spec = registry.get(module)
        source = ctx.build.output("export", module, "onnx", hint="run `autoglm-build export` first")
        settings = ctx.cfg.optimize
        model = onnx.load(str(source))
        before = Counter(n.op_type for n in model.graph.node)
        model, applied = self.rewrite(ctx, model, settings)
        after = Counter(n.op_type for n in model.graph.node)
        with tempfile.TemporaryDirectory(dir=ctx.workdir, prefix=f".optimize-{module}-") as tmp:
            files = save_model(model, Path(tmp) / f"{module}.onnx", ctx.cfg.export.large_model_bytes)
            del model
            ctx.status("checking against the exported graph in ONNX Runtime")
            check = self.check(ctx, spec, source, files[0])
            metrics = {
                "opset": settings.opset, "nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
                "nodes_removed": sum(before.values()) - sum(after.values()), "ops_before": dict(before),
                "ops_after": dict(after), "rewrites": applied, **check,
            }
            if not check["passed"]:
                worst = max(check["rows"], key=lambda r: r["max_abs"])
                err = AccuracyError(f"{module}: optimized graph differs from the exported one on '{worst['output']}' "
                                    f"({worst['case']}, batch {worst['batch']}): max abs {worst['max_abs']:.3g}")
                err.metrics = metrics  # type: ignore[attr-defined]
                raise err
            outputs = move_into_place(files, ctx.workdir / OPTIMIZED_DIR, module, "onnx")
        return StageResult(outputs=outputs, params={"source": source.relative_to(ctx.workdir).as_posix()},
                           metrics=metrics)

    def rewrite(self, ctx: StageContext, model: Any, settings: Any):
        applied: Dict[str, Any] = {}
        if opset_of(model) < settings.opset:
            ctx.status(f"opset {opset_of(model)} -> {settings.opset}")
            model = upgrade_opset(model, settings.opset)
        for name in settings.rewrites:
            rewrite = REWRITES[name]()
            reason = rewrite.skip_reason(opset_of(model))
            if reason:
                applied[name] = f"skipped: {reason}"
                continue
            ctx.status(name)
            model, count = rewrite(model)
            applied[name] = count
        return model, applied

    def check(self, ctx: StageContext, spec: Any, source: Path, optimized: Path) -> Dict[str, Any]:
        import onnxruntime as ort

        opts = ort_options()
        outputs = spec.output_names(ctx.cfg)
        sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in (optimized, source)]
        rows = compare_cases(spec.name, spec.cases(ctx.cfg, np.random.default_rng(99)),
                             run=ort_runner(sessions[0], outputs), reference=ort_runner(sessions[1], outputs),
                             tolerance=ctx.cfg.optimize.tolerance)
        return summarize(rows)


def upgrade_opset(model: Any, target: int) -> Any:
    """onnx's version converter on a weightless copy (it serializes the model: 2 GB would not pass),
    the weights put back by name afterwards."""
    import onnx
    from onnx import version_converter

    weights = {t.name: t for t in model.graph.initializer}
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for t in light.graph.initializer:
        t.ClearField("raw_data")
        del t.external_data[:]
        t.ClearField("data_location")
    converted = version_converter.convert_version(light, target)
    for t in converted.graph.initializer:
        if t.name in weights and not t.raw_data:
            t.CopyFrom(weights[t.name])
    return converted
