"""``verify``: every precision graph and every engine against ONNX Runtime on the FP32 graph.

Inputs are the ``samples`` stage's real calibration samples at each batch size (for the decoder: a
prefill and greedy decode steps, with the cache from the FP32 graph, so all backends see identical
inputs). Tolerances are per precision (``engine.tolerances``), relative to each output's scale as
everywhere in this tool (:mod:`autoglm_build.validate`).

- ONNX Runtime (always, CPU included): ``int8/`` and ``fp16/`` graphs vs the FP32 graph.
- TensorRT (where it is installed): each engine in the manifest, checked before loading (sidecar
  TensorRT version and compute capability, sha256 vs the manifest), run one step at a time by
  Polygraphy's ``TrtRunner`` (driven by ``Comparator.run``; the decoder's prefill and decode
  profiles in turn).

The reference is an ONNX Runtime session on the FP32 graph, run once per batch; every backend's
outputs are compared with it here (:func:`_compare`: ``max|a - b|`` against ``atol + rtol *
max|ref|`` per output group), not by Polygraphy's ``OnnxrtRunner`` or its comparison functions.
The rows are stored in the manifest (``verify/<module>`` records; the latest row per backend,
precision, output and batch wins).

Every file (samples, graphs, engines) comes from the opened :class:`~autoglm_build.workdir.Build`,
checked against its manifest record before it is read: a substituted file is refused (exit 2).

Imports on the GPU harness's Python 3.9 without torch.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from autoglm_build.config import BuildConfig, Tolerance
from autoglm_build.engine import tensorrt as trt_env
from autoglm_build.engine.sidecar import check_loadable, deserialize
from autoglm_build.errors import UserError
from autoglm_build.onnx_io import feed_for, ort_options
from autoglm_build.stages.samples import load_samples
from autoglm_build.validate import output_group
from autoglm_build.workdir import Build

Feed = Dict[str, np.ndarray]
Run = Callable[[List[Feed]], List[Dict[str, np.ndarray]]]


def verify(cfg: BuildConfig, workdir: Path, modules: Sequence[str], precisions: Sequence[str],
           status: Callable[[str], None] = lambda m: None) -> Dict[str, Any]:
    """Rows (module | backend | precision | output | batch | max abs | max rel | tol | pass) and notes."""
    build = Build(workdir, cfg=cfg)
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    engines = trt_env.available()
    if not engines:
        notes.append("TensorRT engine checks skipped: TensorRT is not installed here (ONNX Runtime checks ran)")
    for module in modules:
        samples = load_samples(build.samples(module))
        reference = _ort_run(build.fp32_graph(module))
        want = {b: reference(steps) for b, steps in samples.items()}
        for precision in precisions:
            tol = cfg.engine.tolerances[precision]
            # the fp32 graph is the reference itself: only calibrated graphs are compared to it
            graph = build.graph(module, precision) if precision != "fp32" else None
            if graph is not None:
                status(f"{module} {precision}: ONNX Runtime")
                rows += _compare(module, "onnxruntime", precision, _ort_run(graph), samples, want, tol)
            if engines:
                engine = build.artifact(f"engine-{precision}", module, "engine")
                if engine is None:
                    notes.append(f"{module}: no {precision} engine in {workdir}")
                    continue
                status(f"{module} {precision}: TensorRT")
                run = _trt_run((build.check(engine), engine.sha256), module)
                rows += _compare(module, "tensorrt", precision, run, samples, want, tol)
    report = {"rows": rows, "notes": notes, "passed": all(r["passed"] for r in rows), "engines_checked": engines}
    store(build, report)
    return report


def store(build: Build, report: Dict[str, Any]) -> None:
    """Merge ``report``'s rows into the manifest's ``verify/<module>`` records under its lock: the
    latest row per (backend, precision, output, batch) wins; status ``failed`` while any is out."""
    import time

    from autoglm_build.manifest import Manifest, StageRecord

    def key(row: Dict[str, Any]) -> tuple:
        return row["backend"], row["precision"], row["output"], row["batch"]

    def merge(fresh: Manifest) -> None:
        for module in sorted({r["module"] for r in report["rows"]}):
            old = fresh.record("verify", module)
            rows = {key(r): r for r in (old.metrics.get("rows", []) if old else [])}
            rows.update({key(r): r for r in report["rows"] if r["module"] == module})
            passed = all(r["passed"] for r in rows.values())
            fresh.put(StageRecord(stage="verify", module=module, status="done" if passed else "failed",
                                  fingerprint="", started=time.time(),
                                  metrics={"passed": passed, "rows": list(rows.values())}), [])

    build.manifest.update(build.workdir, merge)


def _compare(module: str, backend: str, precision: str, run: Run, samples: Dict[int, List[Feed]],
             want: Dict[int, List[Dict[str, np.ndarray]]], tol: Tolerance) -> List[Dict[str, Any]]:
    rows = []
    for batch, steps in samples.items():
        got = run(steps)
        errors: Dict[str, List[float]] = {}
        for step, out_got, out_want in zip(steps, got, want[batch]):
            for name, ref in out_want.items():
                value = out_got[name]
                if value.shape != ref.shape:
                    raise UserError(f"{module} {backend} {precision}: output '{name}' has shape {list(value.shape)}, "
                                    f"expected {list(ref.shape)}")
                err = errors.setdefault(output_group(name), [0.0, 0.0])
                value, ref = _real_positions(name, step, value, ref)
                diff = np.abs(value.astype(np.float64) - ref)
                err[0] = max(err[0], float(diff.max()) if diff.size else 0.0)
                err[1] = max(err[1], float(np.abs(ref).max()) if ref.size else 0.0)
        for group, (max_abs, scale) in errors.items():
            rows.append({
                "module": module, "backend": backend, "precision": precision, "output": group, "batch": batch,
                "steps": len(steps), "max_abs": max_abs, "max_rel": max_abs / scale if scale else 0.0,
                "atol": tol.atol, "rtol": tol.rtol, "passed": max_abs <= tol.atol + tol.rtol * scale,
            })
    return rows


def _real_positions(name: str, step: Feed, value: np.ndarray, ref: np.ndarray):
    """Cache entries of left-padding positions are never attended to: compare real positions only."""
    mask = step.get("attention_mask")
    if not name.startswith("present_") or mask is None:
        return value, ref
    keep = (mask > 0)[:, None, :, None]  # (batch, 1, total_seq, 1) against (batch, heads, total_seq, dim)
    return np.where(keep, value, 0.0), np.where(keep, ref, 0.0)


def _ort_run(path: Path) -> Run:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), ort_options(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(steps: List[Feed]) -> List[Dict[str, np.ndarray]]:
        return [dict(zip(names, session.run(names, feed_for(session, step)))) for step in steps]

    return run


def _trt_run(engine_info, module: str) -> Run:
    """TensorRT through Polygraphy's TrtRunner; prefill steps on profile 0, decode steps on profile 1.

    Polygraphy logs on stdout, which carries only the result (``--json``): its output goes to stderr."""
    path, sha = engine_info
    trt = trt_env.load()
    with contextlib.redirect_stdout(sys.stderr):
        from polygraphy.backend.trt import TrtRunner
        from polygraphy.comparator import Comparator
    sidecar = check_loadable(path, sha, trt.__version__, trt_env.gpu()["compute_capability"])
    engine = deserialize(trt, path)
    dtypes = {name: trt_env.numpy_dtype(trt, engine.get_tensor_dtype(name), name)
              for name in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors))}

    def run(steps: List[Feed]) -> List[Dict[str, np.ndarray]]:
        outputs = []
        for k, step in enumerate(steps):
            profile = 0 if len(sidecar.profiles) == 1 or k == 0 else 1
            feed = {n: np.ascontiguousarray(v.astype(dtypes.get(n, v.dtype))) for n, v in step.items()}
            runner = TrtRunner(engine, optimization_profile=profile, name=f"trt-{module}")
            with contextlib.redirect_stdout(sys.stderr):
                results = Comparator.run([runner], data_loader=[feed])  # activates and deactivates the runner
            out = results[0][1][0]
            outputs.append({name: np.asarray(out[name]).astype(np.float32) for name in out.keys()})
        return outputs

    return run
