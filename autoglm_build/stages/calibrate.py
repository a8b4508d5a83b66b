"""Stages ``calibrate-int8`` and ``calibrate-fp16``: precision carried by the graph.

INT8 (explicit quantization, what TensorRT >= 8 reads and TensorRT 11 requires):
1. Stream the module's real calibration batches through ONNX Runtime's calibrator one batch at a
   time (memory bounded by one batch's activations), collecting ranges (entropy, min-max or
   percentile histograms merged across batches).
2. ``onnxruntime.quantization.quantize_static`` in QDQ format from those ranges: symmetric INT8
   activations, per-channel symmetric INT8 weights (Q/DQ pairs on the FP32 weights, dedicated pairs
   per consumer, as TensorRT wants), on ``calibrate.op_types`` minus the nodes the policy keeps FP16;
   other consumers of a quantized tensor read the float tensor (:class:`QDQOnlyOnQuantizedOps`).
3. The policy's nodes (embedding table and LM head by default) become FP16 islands between Casts;
   normalizations, softmax and the residual adds feeding a normalization stay FP32 whatever the
   policy says (:func:`~autoglm_build.precision.fp32_nodes`); graph I/O stays FP32 but for the
   decoder's KV cache, which is FP16 (``ModuleSpec.fp16_io``). At opset 19-20 (``optimize.opset``)
   the whole graph is FP16 around its Q/DQ pairs instead (FP16 scales, FP16 into every
   QuantizeLinear and out of every DequantizeLinear, the same FP32 islands:
   :func:`~autoglm_build.precision.fp16_around_qdq`); below 19 Q/DQ are FP32 only, and so are the
   layers between them under strong typing.
4. Accuracy against the FP32 graph on held-out samples (:mod:`autoglm_build.accuracy`), held
   against ``calibrate.gate`` (cosine; greedy agreement for the decoder, with a checkpoint). When the
   INT8 graph misses the gate, or a ``target_cosine`` is set, layers are ranked by the error their
   quantization alone adds and moved to FP16, worst first, until gate and target hold; a graph
   that still misses the gate fails the stage (exit 3, its numbers recorded).
5. A TensorRT calibration cache from the same ranges, for implicit-INT8 builds on TensorRT 8.x-10
   (TensorRT 11 has no calibrators; ``calibrate.trt_version`` 11 or later writes no cache).

FP16: the graph converted by onnxruntime's float16 converter but for the same FP32 islands, I/O kept
FP32 but for the KV cache; a fused ``Attention`` (opset 23) goes FP16 whole with its softmax in FP32
(``softmax_precision``). Every graph written is checked: no FP16 ``Pow``/``ReduceMean``/
``LayerNormalization``/``RMSNormalization``/``Softmax``, no FP16 ``Attention`` with a softmax that is
not FP32 (:func:`~autoglm_build.precision.fp16_reductions`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from autoglm_build.accuracy import Agreement, gate_failures, gate_of
from autoglm_build.calibration import CalibrationData, check_calibration_data
from autoglm_build.config import BuildConfig, CalibrateConfig
from autoglm_build.errors import AccuracyError, UserError
from autoglm_build.modules import registry
from autoglm_build.modules.base import ModuleSpec
from autoglm_build.onnx_io import feed_for, move_into_place, ort_options, save_model
from autoglm_build.parts import Around, ort_part
from autoglm_build.precision import (
    FP16_QDQ_OPSET,
    FP16_SCALE_RANGE,
    census,
    fp16_around_qdq,
    fp16_islands,
    fp16_reductions,
    policy_nodes,
    qdq_count,
    to_fp16,
    trt_cache_header,
    write_trt_cache,
)
from autoglm_build.rewrites.base import opset_of
from autoglm_build.rewrites.qdq import QDQOnlyOnQuantizedOps
from autoglm_build.stages.base import Stage, StageContext, StageResult

Feed = Dict[str, np.ndarray]
MAX_INT8_OPSET = 20
CENSUS = {
    "embedding": ["embed_tokens"],
    "normalization": ["norm", "op:LayerNormalization"],
    "softmax": ["op:Softmax"],
    "attention (fused)": ["op:Attention"],
    "lm_head": ["lm_head"],
    "matmul/conv (other)": ["op:MatMul", "op:Gemm", "op:Conv"],
}


def fp32_artifacts(manifest, module: str, kind: Optional[str] = None) -> list:
    """The module's FP32 graph artifacts: the optimized graph's, else the exported one's."""
    return manifest.artifacts_of("optimize", module, kind) or manifest.artifacts_of("export", module, kind)


def fp32_graph(ctx: StageContext, module: str) -> Path:
    """The module's FP32 graph from the manifest (the optimized one, else the exported one), checked
    against its record."""
    return ctx.build.fp32_graph(module)


class CalibrateStage(Stage):
    """Mixed-precision graphs per module.

    Args:
        precision: ``int8`` (Q/DQ + FP16 islands) or ``fp16``.
        overrides: ``calibrate`` fields set on the command line (method, batches, target_cosine).
    """

    version = 3  # 3: FP16 around the Q/DQ pairs at opset >= 19
    tools = ("onnx", "onnxruntime", "transformers", "tokenizers", "pillow")

    def __init__(self, precision: str, overrides: Optional[Dict[str, Any]] = None) -> None:
        if precision not in ("int8", "fp16"):
            raise ValueError(precision)
        self.precision = precision
        self.name = f"calibrate-{precision}"
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}

    def settings(self, cfg: BuildConfig) -> CalibrateConfig:
        return cfg.calibrate.model_copy(update=self.overrides)

    def measures(self, cfg: BuildConfig) -> bool:
        """Whether this stage measures its graphs against FP32 (INT8 always; FP16 unless
        ``calibrate.measure_fp16: false``)."""
        return self.precision == "int8" or self.settings(cfg).measure_fp16

    def reads_prompts(self, cfg: BuildConfig) -> bool:
        return self.measures(cfg)  # an FP16 graph not measured here reads no data

    def check_inputs(self, cfg: BuildConfig, modules: List[str]) -> None:
        if self.measures(cfg):
            check_calibration_data(Path(self.settings(cfg).data), modules)

    def fingerprint_data(self, ctx: StageContext, module: str) -> Dict[str, Any]:
        settings = self.settings(ctx.cfg)
        if not self.measures(ctx.cfg):
            # what the unmeasured FP16 graph is made of (:meth:`fp16_unmeasured`): its FP32 graph and which of
            # its inputs and outputs stay FP16; not the data, gate or INT8 settings it never reads, which would
            # rebuild every stage for nothing
            return {"module": module, "inputs": {module: [a.sha256 for a in fp32_artifacts(ctx.manifest, module)]},
                    "measured": False, "fp16_io": registry.get(module).fp16_io(ctx.cfg)}
        graphs = {m: fp32_artifacts(ctx.manifest, m) for m in _upstream(ctx.cfg, module)}
        earlier = {p: [a.sha256 for a in ctx.manifest.artifacts_of(self.name, p)] for p in _earlier(ctx.cfg, module)}
        return {
            "module": module,
            "inputs": {m: [a.sha256 for a in arts] for m, arts in graphs.items()},
            "earlier": earlier,  # a stage of a staged module is measured after the stages before it
            "settings": settings.model_dump(mode="json"),
            "data": data_fingerprint(Path(settings.data), ctx.cfg),
            "text": ctx.cfg.section("text"),
        }

    def __call__(self, ctx: StageContext, module: str) -> StageResult:
        import onnx

        spec = registry.get(module)
        settings = self.settings(ctx.cfg)
        cfg = ctx.cfg.model_copy(update={"calibrate": settings})
        source = fp32_graph(ctx, module)
        if not self.measures(ctx.cfg):
            return self.fp16_unmeasured(ctx, spec, module, source)
        graphs = {m: fp32_graph(ctx, m) for m in _upstream(ctx.cfg, module)}
        ctx.status("preprocessing calibration data")
        calib, held = spec.calibration_batches(cfg, CalibrationData.discover(Path(settings.data)), graphs)
        around = spec.accuracy_around(cfg, graphs, self.earlier_graphs(ctx, module))
        warnings: List[str] = []
        with tempfile.TemporaryDirectory(dir=ctx.workdir, prefix=f".{self.name}-{module}-") as tmp:
            tmp_dir = Path(tmp)
            if self.precision == "fp16":
                model, metrics, extra = to_fp16(onnx.load(str(source)), spec.fp16_io(cfg)), {}, []
            else:
                model, metrics, extra = self.to_int8(ctx, spec, cfg, source, calib, held, tmp_dir, around)
                warnings += _scale_warnings(module, metrics)
            ctx.status("measuring accuracy on held-out samples")
            metrics["accuracy"] = accuracy(spec, cfg, source, model, held, tmp_dir, around)
            check_gate(module, self.precision, cfg, metrics)
            metrics.update(calibration_batches=len(calib), heldout_batches=len(held))
            outputs = self.write_graph(ctx, module, model, tmp_dir, extra, metrics)
        params = {"method": settings.method, "batch_size": settings.batch_size, "source": str(source)}
        return StageResult(outputs=outputs, params=params, metrics=metrics, warnings=warnings)

    def fp16_unmeasured(self, ctx: StageContext, spec: ModuleSpec, module: str, source: Path) -> StageResult:
        """``calibrate.measure_fp16: false``: the FP16 graph, converted and checked as always, without the
        accuracy measurement (no calibration data read, no stage before this one needed): ``verify`` measures
        it, the chained graphs against FP32. ``metrics.accuracy`` is None and the stage warns."""
        import onnx

        model = to_fp16(onnx.load(str(source)), spec.fp16_io(ctx.cfg))
        metrics: Dict[str, Any] = {"accuracy": None, "calibration_batches": 0, "heldout_batches": 0}
        with tempfile.TemporaryDirectory(dir=ctx.workdir, prefix=f".{self.name}-{module}-") as tmp:
            outputs = self.write_graph(ctx, module, model, Path(tmp), [], metrics)
        warning = (f"{module}: fp16 accuracy not measured (calibrate.measure_fp16: false); "
                   f"autoglm-build verify -m {spec.module} --precision fp16 measures it")
        return StageResult(outputs=outputs, params={"source": str(source), "measured": False},
                           metrics=metrics, warnings=[warning])

    def write_graph(self, ctx: StageContext, module: str, model: Any, tmp_dir: Path, extra: List[Path],
                    metrics: Dict[str, Any]) -> List[Any]:
        """The precision graph checked (no FP16 reduction: a bug in the precision policy, not the user's, that
        would overflow the engine; ONNX's checker), its Q/DQ and precision counts added to ``metrics``, and
        moved into place with ``extra`` (the TensorRT calibration cache)."""
        import onnx

        offenders = fp16_reductions(model)
        if offenders:
            raise RuntimeError(f"{module}: FP16 reductions in the {self.precision} graph: {offenders[:5]}")
        metrics.update(qdq=qdq_count(model), precision_census=census(model, CENSUS))
        files = save_model(model, tmp_dir / f"{module}.onnx", ctx.cfg.export.large_model_bytes)
        onnx.checker.check_model(str(files[0]))
        return move_into_place(files + extra, ctx.workdir / self.precision, module, "onnx-" + self.precision)

    def earlier_graphs(self, ctx: StageContext, module: str) -> Dict[str, Path]:
        """This precision's graphs of the stages before ``module`` (a stage of a staged module), checked.

        Raises:
            UserError: one of them is not made yet.
        """
        out = {}
        for part in _earlier(ctx.cfg, module):
            graph = ctx.build.graph(part, self.precision)
            if graph is None:
                raise UserError(f"{module}: no {self.precision} graph of {part} in {ctx.workdir}: a stage is "
                                "calibrated after the stages before it",
                                hint=f"autoglm-build calibrate --{self.precision} -m {part.split('.')[0]}")
            out[part] = graph
        return out

    # ---- int8 -----------------------------------------------------------------------------------

    def to_int8(self, ctx, spec, cfg, source, calib, held, tmp_dir, around=None):
        import onnx

        settings = cfg.calibrate
        opset = opset_of(onnx.load(str(source), load_external_data=False))
        if opset > MAX_INT8_OPSET:
            raise UserError(
                f"{spec.name}: the FP32 graph is at opset {opset}; INT8 calibration needs opset <= {MAX_INT8_OPSET} "
                "(onnxruntime.quantization writes QuantizeLinear nodes that fail validation at opset >= 21)",
                hint=f"set optimize.opset: {MAX_INT8_OPSET} or lower for INT8 builds",
            )
        module_policy = settings.modules.get(spec.module)
        patterns = (module_policy.fp16_patterns if module_policy and module_policy.fp16_patterns
                    else settings.fp16_patterns)
        base = onnx.load(str(source), load_external_data=False)
        kept = policy_nodes(base, patterns)
        candidates = [n.name for n in base.graph.node if n.op_type in settings.op_types and n.name not in kept]
        if module_policy is not None and not module_policy.int8:
            kept, candidates = [n.name for n in base.graph.node], []
        metrics: Dict[str, Any] = {"fp16_policy_nodes": len(kept), "int8_candidates": len(candidates)}
        if not candidates:  # e.g. the embedding table: nothing to quantize, the policy keeps it FP16
            model, ranges = fp16_islands(onnx.load(str(source)), kept, spec.fp16_io(cfg)), {}
        else:
            ranges_file = tmp_dir / "ranges.json"
            ranges = calibrate_ranges(ctx, source, settings, calib, ranges_file, tmp_dir)
            quantizer = Quantizer(source, settings, ranges_file, kept, tmp_dir, spec.fp16_io(cfg))
            model = quantizer(candidates)
            if settings.target_cosine is not None or gate_failures(
                    accuracy(spec, cfg, source, model, held, tmp_dir, around), gate_of(cfg)):
                model, metrics["fallback"] = fallback(ctx, spec, cfg, source, quantizer, candidates, held, tmp_dir,
                                                      around)
            metrics["qdq_float"] = "float16" if opset >= FP16_QDQ_OPSET else "float32"
            metrics["fp16_scales_clamped"] = quantizer.scales_clamped  # of the graph last made: this one
        if int(settings.trt_version.split(".")[0]) >= 11:
            metrics["trt_cache"] = {"skipped": f"TensorRT {settings.trt_version} has no implicit INT8 calibrators"}
            return model, metrics, []
        cache = tmp_dir / f"{spec.name}.calib.cache"
        header = trt_cache_header(settings.trt_version, settings.method)
        metrics["trt_cache"] = {"header": header, "tensors": write_trt_cache(cache, ranges, header)}
        return model, metrics, [cache]


def _scale_warnings(module: str, metrics: Dict[str, Any]) -> List[str]:
    clamped = metrics.get("fp16_scales_clamped", 0)
    if not clamped:
        return []
    low, high = FP16_SCALE_RANGE
    return [f"{module}: {clamped} Q/DQ scale value(s) clamped into FP16's range [{low:.3g}, {high:g}] "
            "(amax/127 not representable in FP16; a nearly all-zero weight channel)"]


def _upstream(cfg: BuildConfig, module: str) -> List[str]:
    """Graphs a module's calibration reads: the decoder embeds its prompts with ``embed`` and, staged,
    runs every stage (the later stages' inputs, the greedy tokens); another staged module (``vision``
    with ``vision.stages``), or one of its stages, reads every stage of it (the earlier ones' outputs,
    the later ones to measure a stage as the module)."""
    spec = registry.get(module)
    if spec.module == "decoder":
        return ["embed", *spec.parts(cfg)]
    return spec.parts(cfg)


def _earlier(cfg: BuildConfig, module: str) -> List[str]:
    """The stages before ``module`` when it is one stage of a staged module, else none."""
    spec = registry.get(module)
    parts = spec.parts(cfg)
    return parts[:parts.index(module)] if module in parts and module != spec.module else []


def data_fingerprint(root: Path, cfg: BuildConfig) -> str:
    """sha256 over every calibration file's path and bytes, and the tokenizer (a few MB: cheap)."""
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    if cfg.tokenizer and Path(cfg.tokenizer).is_file():
        files.append(Path(cfg.tokenizer))
    for path in files:
        digest.update(str(path.relative_to(root) if root in path.parents else path.name).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# ---- calibration -----------------------------------------------------------------------------


class _OneBatch:
    """onnxruntime's CalibrationDataReader over a single feed."""

    def __init__(self, feed: Feed) -> None:
        self.feed: Optional[Feed] = feed

    def get_next(self) -> Optional[Feed]:
        feed, self.feed = self.feed, None
        return feed


def calibrate_ranges(ctx, source: Path, settings: CalibrateConfig, feeds: Sequence[Feed], out: Path,
                     tmp_dir: Path) -> Dict[str, Tuple[float, float]]:
    """Ranges of every tensor feeding ``op_types``, one batch in memory at a time; saved to ``out``."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    method = calibration_method(settings.method)
    extra = {"symmetric": True}
    if settings.method == "percentile":
        extra["percentile"] = settings.percentile
    with _quiet():
        calibrator = create_calibrator(source, list(settings.op_types), augmented_model_path=str(tmp_dir / "aug.onnx"),
                                       calibrate_method=method, use_external_data_format=True, extra_options=extra)
        for i, feed in enumerate(feeds):
            ctx.status(f"calibrating ({settings.method}) batch {i + 1}/{len(feeds)}")
            calibrator.collect_data(_OneBatch(feed))
        data = calibrator.compute_data()
    save_tensors_data(data, str(out))
    return {name: (float(np.min(r.range_value[0])), float(np.max(r.range_value[1])))
            for name, r in data.data.items()}


def calibration_method(name: str):
    """onnxruntime's CalibrationMethod for ``calibrate.method``."""
    from onnxruntime.quantization import CalibrationMethod

    return {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile}[name]


class Quantizer:
    """Q/DQ graphs from saved ranges, for any set of INT8 nodes (configured once, called per set)."""

    def __init__(self, source: Path, settings: CalibrateConfig, ranges_file: Path, fp16_nodes: List[str],
                 tmp_dir: Path, fp16_io: Sequence[str] = ()) -> None:
        self.source, self.settings, self.ranges_file = source, settings, ranges_file
        self.fp16_nodes, self.tmp_dir, self.fp16_io = list(fp16_nodes), tmp_dir, list(fp16_io)
        self.scales_clamped = 0  # by the last call (FP16 Q/DQ only)

    def __call__(self, int8_nodes: Sequence[str], extra_fp16: Sequence[str] = ()):
        import onnx
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        out = self.tmp_dir / "q.onnx"
        method = calibration_method(self.settings.method)
        with _quiet():
            quantize_static(
                str(self.source), str(out), None, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(self.settings.op_types), nodes_to_quantize=list(int8_nodes) or ["<none>"],
                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=method, calibration_cache_path=str(self.ranges_file), use_external_data_format=True,
                extra_options={
                    "ActivationSymmetric": True, "WeightSymmetric": True, "AddQDQPairToWeight": True,
                    "DedicatedQDQPair": True, "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                    "QuantizeBias": False,  # biases stay float: TensorRT fuses them into the INT8 layer itself
                },
            )
        model = onnx.load(str(out))
        QDQOnlyOnQuantizedOps(self.settings.op_types)(model)
        if opset_of(model) >= FP16_QDQ_OPSET:  # FP16 everywhere but the FP32 islands: the policy is moot
            model, self.scales_clamped = fp16_around_qdq(model, self.fp16_io)
            return model
        return fp16_islands(model, self.fp16_nodes + list(extra_fp16), self.fp16_io)


class _quiet:
    """onnxruntime.quantization logs advice on the root logger and prints its progress on stdout;
    stdout is ours (the result) and our own status line reports progress, so both are muted."""

    def __enter__(self):
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        self.sink = open(os.devnull, "w")
        self.redirect = contextlib.redirect_stdout(self.sink)
        self.redirect.__enter__()

    def __exit__(self, *exc):
        self.redirect.__exit__(*exc)
        self.sink.close()
        logging.getLogger().setLevel(self.level)


# ---- accuracy and fallback ---------------------------------------------------------------------


def accuracy(spec: ModuleSpec, cfg: BuildConfig, source: Path, model, held: Sequence[Feed],
             tmp_dir: Path, around: Optional[Around] = None) -> Dict[str, Any]:
    """The quantized graph vs the FP32 graph on held-out feeds: cosine, max abs/rel of the first
    output; for the decoder also greedy next-token agreement. With ``around`` (one stage of a staged
    module), both run inside the module and its output is compared (:class:`~autoglm_build.parts.Around`)."""
    import onnxruntime as ort

    path = tmp_dir / "candidate.onnx"
    save_model(model, path, cfg.export.large_model_bytes)
    opts = ort_options(shared=True)
    ref = ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    if around is not None:
        run_ref, run_got = around.runs(ort_part(source, ref), ort_part(path, got))
        agreement = Agreement(around.output)
        for feed in around.feeds:
            agreement.add(run_ref(feed)[around.output], run_got(feed)[around.output])
        return agreement.result()
    output = spec.output_names(cfg)[0]
    agreement = Agreement(output)
    for feed in held:
        agreement.add(ref.run([output], feed_for(ref, feed))[0], got.run([output], feed_for(got, feed))[0])
    return agreement.result()


def check_gate(module: str, precision: str, cfg: BuildConfig, metrics: Dict[str, Any]) -> None:
    """Record the gate in ``metrics``; raise when the graph's accuracy misses it.

    Raises:
        AccuracyError: carrying ``metrics`` (the pipeline stores them in the failed record).
    """
    gate = gate_of(cfg)
    failures = gate_failures(metrics["accuracy"], gate)
    metrics["gate"] = {"cosine": gate.cosine, "greedy_agreement": gate.greedy_agreement, "passed": not failures}
    if failures:
        err = AccuracyError(
            f"{module}: the {precision} graph misses calibrate.gate vs FP32: {'; '.join(failures)}",
            hint="see the sensitivity fallback in the record; keep the module FP16 (calibrate.modules.<name>.int8: "
                 "false) or lower calibrate.gate" if precision == "int8" else "lower calibrate.gate",
        )
        err.metrics = metrics  # type: ignore[attr-defined]
        raise err


def fallback(ctx, spec, cfg, source, quantizer: Quantizer, candidates: List[str], held, tmp_dir, around=None):
    """Move the layers whose quantization costs most to FP16 until the gate and ``target_cosine`` hold.

    Sensitivity of a layer = 1 - cosine of the graph with only that layer in INT8 (everything else
    FP32/FP16 as the policy says). All layers in FP16 are tried first: when even that misses, no
    order of moves can reach the target and AccuracyError says so at once.
    """
    gate, target = gate_of(cfg), cfg.calibrate.target_cosine

    def missed(acc: Dict[str, Any]) -> List[str]:
        low = [] if target is None or acc["cosine_min"] >= target else [f"cosine {acc['cosine_min']:.6f} < {target}"]
        return low + gate_failures(acc, gate)

    ctx.status(f"fallback: all {len(candidates)} layer(s) in FP16")
    floor = accuracy(spec, cfg, source, quantizer([], extra_fp16=candidates), held, tmp_dir, around)
    if missed(floor):
        goal = f"target cosine {target}" if target is not None else "calibrate.gate"
        err = AccuracyError(
            f"{spec.name}: {goal} is unreachable: with all {len(candidates)} quantizable layers in "
            f"FP16, {'; '.join(missed(floor))}",
            hint="lower calibrate.target_cosine or calibrate.gate, or keep this module FP16 "
                 "(calibrate.modules.<name>.int8: false)",
        )
        err.metrics = {"accuracy_all_fp16": floor}  # type: ignore[attr-defined]
        raise err
    sensitivity = {}
    for i, node in enumerate(candidates):
        ctx.status(f"sensitivity {i + 1}/{len(candidates)}: {node}")
        sensitivity[node] = 1.0 - accuracy(spec, cfg, source, quantizer([node]), held, tmp_dir, around)["cosine_min"]
    ranked = sorted(candidates, key=sensitivity.get, reverse=True)
    moved: List[str] = []
    while True:
        model = quantizer([n for n in candidates if n not in moved], extra_fp16=moved)
        reached = accuracy(spec, cfg, source, model, held, tmp_dir, around)
        ctx.status(f"fallback: {len(moved)} layer(s) in FP16, cosine {reached['cosine_min']:.6f} (target {target})")
        if not missed(reached) or len(moved) == len(ranked):
            break
        moved.append(ranked[len(moved)])
    report = {"target_cosine": target, "gate": gate.model_dump(),
              "reached_cosine": reached["cosine_min"], "reached_greedy": reached.get("greedy_agreement"),
              "moved_to_fp16": moved, "sensitivity": {n: sensitivity[n] for n in ranked[:20]}}
    return model, report
