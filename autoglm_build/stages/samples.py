"""Stage ``samples``: verification inputs made from real calibration data, saved as ``.npz``.

``verify`` runs engines against ONNX Runtime "on calibration samples" at batch 1, 4 and 8, on the
GPU harness's Python 3.9, where transformers' processors are not installed. So the samples are
preprocessed here, once, into ``samples/<module>.npz``: each step of each batch size as arrays
named ``b<batch>/s<step>/<input>``. For the decoder the steps are a prefill of real prompts and
greedy decode steps whose cache comes from the FP32 graph, so every backend sees identical inputs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from autoglm_build.calibration import CalibrationData, check_calibration_data
from autoglm_build.config import BuildConfig
from autoglm_build.modules import registry
from autoglm_build.onnx_io import move_into_place
from autoglm_build.stages.base import Stage, StageContext, StageResult
from autoglm_build.stages.calibrate import _upstream, data_fingerprint, fp32_artifacts, fp32_graph

Feed = Dict[str, np.ndarray]


class SamplesStage(Stage):
    """``samples``: per module, verification feeds at every ``export.batch_sizes`` from real data."""

    name = "samples"
    version = 2  # 2: vision verifies three screenshot sizes
    tools = ("onnxruntime", "transformers", "tokenizers", "pillow")
    per_part = False  # a staged decoder's samples are the whole decoder's inputs (verify chains its stages)

    def reads_prompts(self, cfg: BuildConfig) -> bool:
        return True

    def check_inputs(self, cfg: BuildConfig, modules: List[str]) -> None:
        check_calibration_data(Path(cfg.calibrate.data), modules)

    def fingerprint_data(self, ctx: StageContext, module: str) -> Dict[str, Any]:
        graphs = {m: [a.sha256 for a in fp32_artifacts(ctx.manifest, m)] for m in _upstream(ctx.cfg, module)}
        return {"module": module, "graphs": graphs, "batches": ctx.cfg.export.batch_sizes,
                "data": data_fingerprint(Path(ctx.cfg.calibrate.data), ctx.cfg)}

    def __call__(self, ctx: StageContext, module: str) -> StageResult:
        spec = registry.get(module)
        batch = max(ctx.cfg.export.batch_sizes)
        cfg = ctx.cfg.model_copy(update={"calibrate": ctx.cfg.calibrate.model_copy(
            update={"batch_size": batch, "holdout": 0.5})})
        graphs = {m: fp32_graph(ctx, m) for m in _upstream(ctx.cfg, module)}
        ctx.status("preprocessing calibration data")
        data = CalibrationData.discover(Path(cfg.calibrate.data))
        calib, held = spec.calibration_batches(cfg, data, graphs)
        steps = spec.verification_feeds(ctx.cfg, data) or _first_chain(held + calib, module)
        arrays = {}
        for b in ctx.cfg.export.batch_sizes:
            for k, step in enumerate(steps):
                for name, value in spec.take_rows(ctx.cfg, step, b).items():
                    arrays[f"b{b}/s{k}/{name}"] = value
        with tempfile.TemporaryDirectory(dir=ctx.workdir, prefix=f".samples-{module}-") as tmp:
            path = Path(tmp) / f"{module}.npz"
            np.savez(path, **arrays)
            outputs = move_into_place([path], ctx.workdir / "samples", module, "samples")
        return StageResult(outputs=outputs, params={"batches": ctx.cfg.export.batch_sizes},
                           metrics={"steps": len(steps), "arrays": len(arrays)})


def _first_chain(feeds: List[Feed], module: str) -> List[Feed]:
    """One prefill and its decode steps for the decoder (they come in order), else one feed."""
    if module != "decoder":
        return feeds[:1]
    chain = [feeds[0]]
    for feed in feeds[1:]:
        if "past_key.0" in feed and feed["past_key.0"].shape[2] == 0:
            break  # the next prefill
        chain.append(feed)
    return chain


def load_samples(path: Path) -> Dict[int, List[Feed]]:
    """``{batch: [step feeds]}`` from a samples ``.npz``."""
    out: Dict[int, Dict[int, Feed]] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            b, s, name = key.split("/", 2)
            out.setdefault(int(b[1:]), {}).setdefault(int(s[1:]), {})[name] = data[key]
    return {b: [steps[k] for k in sorted(steps)] for b, steps in sorted(out.items())}
