"""``verify``: two questions, asked separately, on real samples at each batch size.

1. Is each precision graph accurate enough? (``onnxruntime``) The ``int8/`` and ``fp16/`` graphs in
   ONNX Runtime against the FP32 graph: cosine of every sample's main output and, for the decoder,
   greedy next-token agreement, held against ``calibrate.gate`` (:mod:`autoglm_build.accuracy`, the
   same measure and gate as calibrate's report).
2. Is each engine a faithful build of its own graph? (``tensorrt``, where TensorRT is installed) The
   engine against ONNX Runtime running the graph it was built from (int8 engine vs the int8 graph,
   fp16 vs fp16, fp32 vs the FP32 graph), every output at a tight tolerance (``engine.tolerances``:
   ``max|a - b| <= atol + rtol * max|ref|`` per output group, :func:`_compare`). A broken build (a
   wrong kernel, a layer run in the wrong type, a bias) shows here, not hidden under the
   quantization error that question 1 allows.

Inputs are the ``samples`` stage's (for the decoder: a prefill and decode steps, the cache from the
FP32 graph, so all backends see identical inputs). Engines are checked before loading (sidecar
TensorRT version and compute capability, sha256 vs the manifest) and run one step at a time by
Polygraphy's ``TrtRunner`` (driven by ``Comparator.run``; the decoder's prefill and decode profiles
in turn). The rows are stored in the manifest (``verify/<module>`` records; the latest row per
backend, precision, output and batch wins).

A staged module (``decoder.stages`` > 1) is verified as one: its stages' graphs (engines) run
chained (:mod:`autoglm_build.parts`) on the module's samples, and its rows are the module's.

Every file (samples, graphs, engines) comes from the opened :class:`~autoglm_build.workdir.Build`,
checked against its manifest record before it is read: a substituted file is refused (exit 2).

Imports on the GPU harness's Python 3.9 without torch.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from autoglm_build.accuracy import Agreement, gate_failures, gate_of
from autoglm_build.config import AccuracyGate, BuildConfig, Tolerance
from autoglm_build.engine import tensorrt as trt_env
from autoglm_build.engine.sidecar import check_loadable, deserialize
from autoglm_build.errors import EnvironmentMissing, UserError
from autoglm_build.modules import registry
from autoglm_build.onnx_io import feed_for, ort_options
from autoglm_build.parts import chain_steps
from autoglm_build.stages.samples import load_samples
from autoglm_build.validate import output_group
from autoglm_build.workdir import Build

Feed = Dict[str, np.ndarray]
Outputs = Dict[int, List[Dict[str, np.ndarray]]]  # batch -> per step, output name -> array
Run = Callable[[List[Feed]], List[Dict[str, np.ndarray]]]
BACKENDS = ("onnxruntime", "tensorrt")


def verify(cfg: BuildConfig, workdir: Path, modules: Sequence[str], precisions: Sequence[str],
           status: Callable[[str], None] = lambda m: None, backends: Sequence[str] = BACKENDS) -> Dict[str, Any]:
    """Rows (module | backend | precision | reference | output | batch | figures | pass) and notes.

    Args:
        backends: ``onnxruntime`` (precision graphs vs FP32 under ``calibrate.gate``) and/or
            ``tensorrt`` (engines vs their own graphs; skipped with a note where TensorRT is missing
            unless it is the only one asked for).

    Raises:
        EnvironmentMissing: only ``tensorrt`` was asked for and TensorRT is not installed here.
    """
    build = Build(workdir, cfg=cfg)
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    engines = "tensorrt" in backends and trt_env.available()
    if "tensorrt" in backends and not engines:
        if list(backends) == ["tensorrt"]:
            raise EnvironmentMissing("verify --backend tensorrt: TensorRT is not installed here",
                                     hint="--backend onnxruntime checks the precision graphs without it")
        notes.append("TensorRT engine checks skipped: TensorRT is not installed here (ONNX Runtime checks ran)")
    gate = gate_of(cfg)
    for module in registry.expand(cfg, modules, parts=False):
        samples = load_samples(build.samples(module))
        outputs = _GraphOutputs(build, module, samples)
        for precision in precisions:
            if "onnxruntime" in backends and precision != "fp32":
                status(f"{module} {precision}: ONNX Runtime vs FP32")
                rows += _accuracy_rows(module, precision, outputs(precision), outputs("fp32"), gate)
            if engines:
                parts = registry.get(module).parts(cfg)
                found = [build.artifact(f"engine-{precision}", part, "engine") for part in parts]
                if None in found:
                    notes.append(f"{parts[found.index(None)]}: no {precision} engine in {workdir}")
                    continue
                status(f"{module} {precision}: TensorRT vs the {precision} graph")
                run = chain_steps([_trt_part((build.check(e), e.sha256), part) for e, part in zip(found, parts)])
                tol = cfg.engine.tolerances[precision]
                rows += _compare(module, "tensorrt", precision, run, samples, outputs(precision), tol)
    report = {"rows": rows, "notes": notes, "passed": all(r["passed"] for r in rows), "engines_checked": engines}
    store(build, report)
    return report


class _GraphOutputs:
    """ONNX Runtime's outputs of a module's graphs on the samples, each graph run once when first asked."""

    def __init__(self, build: Build, module: str, samples: Dict[int, List[Feed]]) -> None:
        self.build, self.module, self.samples = build, module, samples
        self.runs: Dict[str, Outputs] = {}

    def __call__(self, precision: str) -> Outputs:
        if precision not in self.runs:
            build = self.build
            parts = registry.get(self.module).parts(build.cfg)  # a staged module: its stages chained
            graphs = [build.fp32_graph(p) if precision == "fp32" else build.graph(p, precision) for p in parts]
            run = chain_steps([_ort_part(graph) for graph in graphs])
            self.runs[precision] = {b: run(steps) for b, steps in self.samples.items()}
        return self.runs[precision]


def _accuracy_rows(module: str, precision: str, got: Outputs, want: Outputs,
                   gate: AccuracyGate) -> List[Dict[str, Any]]:
    """The precision graph's main output (the graph's first) vs the FP32 graph's, per batch."""
    rows = []
    for batch, steps in want.items():
        output = next(iter(steps[0]))
        agreement = Agreement(output)
        for out_want, out_got in zip(steps, got[batch]):
            agreement.add(out_want[output], out_got[output])
        result = agreement.result()
        failures = gate_failures(result, gate)
        rows.append({
            "module": module, "backend": "onnxruntime", "precision": precision, "reference": "fp32 graph",
            "output": output, "batch": batch, "steps": len(steps), "max_abs": result["max_abs"],
            "max_rel": result["max_rel"], "cosine_min": result["cosine_min"],
            "greedy_agreement": result.get("greedy_agreement"), "gate_cosine": gate.cosine,
            "gate_greedy": gate.greedy_agreement if "greedy_agreement" in result else None,
            "failures": failures, "passed": not failures,
        })
    return rows


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
             want: Outputs, tol: Tolerance) -> List[Dict[str, Any]]:
    """Every output of ``run`` against ``want`` (ONNX Runtime on the same graph), at ``tol``."""
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
                diff = np.abs(value.astype(np.float64) - ref.astype(np.float64))
                err[0] = max(err[0], float(diff.max()) if diff.size else 0.0)
                err[1] = max(err[1], float(np.abs(ref).max()) if ref.size else 0.0)
        for group, (max_abs, scale) in errors.items():
            rows.append({
                "module": module, "backend": backend, "precision": precision, "reference": f"{precision} graph",
                "output": group, "batch": batch,
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
    """ONNX Runtime on one graph."""
    return _ort_part(path)[1]


def _ort_part(path: Path) -> Tuple[List[str], Run]:
    """(input names, run) of ONNX Runtime on one graph (a module's, or one stage's)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), ort_options(shared=True), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(steps: List[Feed]) -> List[Dict[str, np.ndarray]]:
        return [dict(zip(names, session.run(names, feed_for(session, step)))) for step in steps]

    return [i.name for i in session.get_inputs()], run


def _trt_part(engine_info, module: str) -> Tuple[List[str], Run]:
    """(input names, run) of TensorRT through Polygraphy's TrtRunner; prefill steps on profile 0,
    decode steps on profile 1.

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

    return list(sidecar.profiles[0]), run
