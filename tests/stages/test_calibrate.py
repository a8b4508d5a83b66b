"""calibrate: Q/DQ INT8 with the FP16 policy read back from the graph, FP16, fallback, TensorRT cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from autoglm_build.config import load_config
from autoglm_build.console import Reporter
from autoglm_build.errors import AccuracyError
from autoglm_build.modules import registry
from autoglm_build.pipeline import Pipeline
from autoglm_build.precision import fp16_reductions, read_trt_cache
from autoglm_build.rewrites.base import opset_of
from autoglm_build.stages.calibrate import CENSUS, CalibrateStage
from autoglm_build.stages.export import ExportStage
from autoglm_build.stages.optimize import OptimizeStage
from tests.conftest import ROOT, TINY, write_config
from tests.helpers import run_onnx


@pytest.fixture(scope="module")
def calibrated(tiny_build, tmp_path_factory):
    """The shared tiny export plus both precision stages, in a private copy."""
    workdir = tmp_path_factory.mktemp("calibrated") / "w"
    shutil.copytree(tiny_build, workdir)
    cfg = load_config(TINY)
    outcomes = Pipeline(cfg, workdir, [CalibrateStage("int8"), CalibrateStage("fp16")], cfg.modules,
                        reporter=Reporter(-1)).run()
    return workdir, {(o.stage, o.module): o.record for o in outcomes}


@pytest.fixture(scope="module")
def calibrated_19(tiny_build, tmp_path_factory):
    """The shared tiny export optimized at opset 19 (``optimize.opset: 19``) and calibrated to INT8,
    in a private copy."""
    root = tmp_path_factory.mktemp("calibrated-19")
    workdir = root / "w"
    shutil.copytree(tiny_build, workdir)
    cfg = load_config(write_config(root / "tiny-19.yaml", {"optimize": {"opset": 19}}))
    outcomes = Pipeline(cfg, workdir, [OptimizeStage(), CalibrateStage("int8")], cfg.modules,
                        reporter=Reporter(-1)).run()
    return workdir, {(o.stage, o.module): o.record for o in outcomes}


def _chdir_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # as from the repo root (calibrate.data itself follows the config file)


@pytest.fixture(autouse=True)
def _root(monkeypatch):
    _chdir_root(monkeypatch)


def test_int8_graphs_have_qdq_and_keep_the_policy_fp16_in_the_graph(calibrated):
    workdir, records = calibrated
    expected_int8 = {"vision": 20, "audio": 20, "embed": 0, "decoder": 16}
    for module, n_int8 in expected_int8.items():
        model = onnx.load(str(workdir / "int8" / f"{module}.onnx"))
        ops = [n.op_type for n in model.graph.node]
        assert (ops.count("QuantizeLinear") > 0) == (n_int8 > 0), module
        from autoglm_build.precision import census

        seen = census(model, CENSUS)  # read from the graph itself
        moved = records[("calibrate-int8", module)].metrics.get("fallback", {}).get("moved_to_fp16", [])
        assert seen["matmul/conv (other)"].get("int8", 0) == n_int8 - len(moved), (module, seen)  # the gate's
        for category in ("embedding", "lm_head"):
            assert set(seen[category]) <= {"fp16"}, (module, category, seen[category])
        for category in ("normalization", "softmax"):  # FP32 whatever the policy (strongly typed TensorRT)
            assert set(seen[category]) <= {"fp32"}, (module, category, seen[category])
        assert records[("calibrate-int8", module)].metrics["qdq"]["QuantizeLinear"] == ops.count("QuantizeLinear")
    decoder = onnx.load(str(workdir / "int8" / "decoder.onnx"))
    assert census(decoder, CENSUS)["lm_head"] == {"fp16": 1}
    embed = onnx.load(str(workdir / "int8" / "embed.onnx"))
    assert census(embed, CENSUS)["embedding"] == {"fp16": 1}
    table = {t.name: t.data_type for t in embed.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in table.values()  # the table itself is stored FP16


def test_int8_and_fp16_graphs_run_at_batch_1_4_8_with_fp32_io_but_an_fp16_kv_cache(calibrated, tiny_cfg):
    workdir, _ = calibrated
    for precision in ("int8", "fp16"):
        for module in registry.names():
            spec = registry.get(module)
            fp16_io = set(spec.fp16_io(tiny_cfg))
            assert bool(fp16_io) == (module == "decoder")
            graph = onnx.load(str(workdir / precision / f"{module}.onnx"), load_external_data=False).graph
            for value in list(graph.input) + list(graph.output):
                if value.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                    want = onnx.TensorProto.FLOAT16 if value.name in fp16_io else onnx.TensorProto.FLOAT
                    assert value.type.tensor_type.elem_type == want, (precision, module, value.name)
            for case in spec.cases(tiny_cfg, np.random.default_rng(0)):
                out = run_onnx(workdir / precision / f"{module}.onnx", case.steps[0])
                assert all(v.dtype == (np.float16 if n in fp16_io else np.float32) for n, v in out.items())
                if spec.batch_axis == "batch":
                    assert all(v.shape[0] == case.batch for v in out.values())


def test_accuracy_report_is_recorded(calibrated):
    workdir, records = calibrated
    manifest = json.loads((workdir / "manifest.json").read_text())
    for module in registry.names():
        for stage in ("calibrate-int8", "calibrate-fp16"):
            acc = manifest["records"][f"{stage}/{module}"]["metrics"]["accuracy"]
            # calibrate.gate is on the mean (one near-zero token can read low at INT8); the trained
            # checkpoint's worst row still stays close
            assert acc["cosine_mean"] >= 0.99 and 0.95 < acc["cosine_min"] <= 1.0 + 1e-9 and acc["samples"] > 0
    dec = records[("calibrate-fp16", "decoder")].metrics["accuracy"]
    assert dec["greedy_agreement"] == 1.0 and dec["greedy_positions"] >= 9
    # issue 16's goal on the trained checkpoint: INT8 greedy agreement >= 98 % (after the gate's fallback)
    assert records[("calibrate-int8", "decoder")].metrics["accuracy"]["greedy_agreement"] >= 0.98


def test_trt_calibration_cache_parses_back_against_the_graph(calibrated):
    workdir, _ = calibrated
    for module in ("vision", "audio", "decoder"):
        header, scales = read_trt_cache(workdir / "int8" / f"{module}.calib.cache")
        assert header == "TRT-8503-EntropyCalibration2"
        graph = onnx.load(str(workdir / "onnx" / f"{module}.onnx"))
        names = {i.name for i in graph.graph.input} | {o for n in graph.graph.node for o in n.output}
        assert scales and set(scales) <= names
        assert all(s > 0 and np.isfinite(s) for s in scales.values())


def test_strict_target_moves_layers_to_fp16_and_holds(tiny_build_copy, tiny_cfg):
    stage = CalibrateStage("int8", {"target_cosine": 0.9995})
    (outcome,) = Pipeline(tiny_cfg, tiny_build_copy, [stage], ["decoder"], reporter=Reporter(-1)).run()
    fallback = outcome.record.metrics["fallback"]
    assert fallback["moved_to_fp16"] and fallback["reached_cosine"] >= 0.9995
    assert outcome.record.metrics["accuracy"]["cosine_min"] >= 0.9995
    seen = outcome.record.metrics["precision_census"]["matmul/conv (other)"]
    assert seen["int8"] == 16 - len(fallback["moved_to_fp16"])


def test_unreachable_target_says_so_and_fails(tiny_build_copy, tiny_cfg):
    stage = CalibrateStage("int8", {"target_cosine": 1.0})
    with pytest.raises(AccuracyError, match="target cosine 1.0 is unreachable"):
        Pipeline(tiny_cfg, tiny_build_copy, [stage], ["audio"], reporter=Reporter(-1)).run()
    assert not (tiny_build_copy / "int8" / "audio.onnx").exists()


def _bad_data(tmp_path, breaker):
    data = tmp_path / "data"
    shutil.copytree(ROOT / "calibration_data", data)
    breaker(data)
    return data


def _nan_npz(data):
    from autoglm_build.config import load_config
    from autoglm_build.modules import registry

    (data / "vision").mkdir()
    feed = registry.get("vision").random_images(load_config(TINY), np.random.default_rng(0), [(112, 112)])
    feed["pixel_values"][0, 0] = np.nan
    np.savez(data / "vision" / "extra.npz", **feed)


@pytest.mark.parametrize(
    "module, breaker, message",
    [
        ("vision", lambda d: (d / "images" / "coffee.jpg").write_bytes(b"\xff\xd8 not a jpeg"),
         r"images/coffee.jpg: not a readable image"),
        ("audio", lambda d: __import__("shutil").copy(ROOT / "tests" / "data" / "tone_8k.wav", d / "audio" / "x.wav"),
         r"audio/x.wav: sample rate 8000 Hz, expected 16000 Hz"),
        ("embed", lambda d: (d / "prompts.jsonl").write_text(""), r"prompts.jsonl: no prompts \(the file is empty\)"),
        ("vision", _nan_npz, r"vision/extra.npz: array 'pixel_values' contains NaN or Inf"),
    ],
)
def test_bad_calibration_data_is_one_line_naming_the_file(tiny_build_copy, tmp_path, module, breaker, message):
    from typer.testing import CliRunner

    from autoglm_build.cli import app
    from tests.conftest import write_config

    data = _bad_data(tmp_path, breaker)
    config = write_config(tmp_path / "c.yaml", {"calibrate": {"data": str(data)}})
    # another config than the one the build recorded: --force takes it (else exit 2 naming both files)
    result = CliRunner().invoke(app, ["calibrate", "--int8", "--force", "-c", str(config),
                                      "-w", str(tiny_build_copy), "-m", module])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and __import__("re").search(message, errors[0]), result.stderr
    assert "Traceback" not in result.output
    assert not (tiny_build_copy / "int8").exists() or not list((tiny_build_copy / "int8").glob(f"{module}*"))
    assert not list(tiny_build_copy.glob(".calibrate-*"))


def test_qdq_pairs_feed_only_the_quantized_ops(calibrated, tiny_cfg):
    """TensorRT's placement: a DequantizeLinear feeds MatMul/Gemm/Conv only (TensorRT 8.5's Myelin
    aborted on the vision encoder's SiLU fed by one)."""
    workdir, _ = calibrated
    for module in ("vision", "audio", "decoder"):
        model = onnx.load(str(workdir / "int8" / f"{module}.onnx"))
        dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
        readers = {n.op_type for n in model.graph.node if dq_out & set(n.input)}
        assert readers <= set(tiny_cfg.calibrate.op_types), (module, readers)


# ---- FP16 around the Q/DQ pairs where the opset allows it (issue 18) --------------------------------

def _types(model):
    """Every tensor's element type, by ONNX type inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def _qdq_float_types(model):
    """(element types every QuantizeLinear reads as input and scale, element types every
    DequantizeLinear gives)."""
    types = _types(model)
    reads = {types.get(n.input[i]) for n in model.graph.node if n.op_type == "QuantizeLinear" for i in (0, 1)}
    gives = {types.get(n.output[0]) for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return reads, gives


def _fp32_op_types(model):
    """Op types of the nodes that compute an FP32 tensor (Casts and Q/DQ aside)."""
    types = _types(model)
    return {n.op_type for n in model.graph.node if n.op_type not in ("Cast", "QuantizeLinear", "DequantizeLinear")
            and n.output and types.get(n.output[0]) == onnx.TensorProto.FLOAT}


def _check_precision_graph(model, label):
    """The graph-precision check and the structure a strongly typed TensorRT reads: no FP16
    reduction, one producer per tensor, unique node names, the full ONNX check."""
    assert fp16_reductions(model) == [], label
    names, outputs = [n.name for n in model.graph.node], [o for n in model.graph.node for o in n.output]
    assert len(set(names)) == len(names) and len(set(outputs)) == len(outputs), label
    onnx.checker.check_model(model, full_check=True)


#: What a normalization, a softmax and the residual add feeding a normalization are made of.
ISLAND_OPS = {"Pow", "ReduceMean", "LayerNormalization", "RMSNormalization", "Softmax",
              "Add", "Sub", "Sqrt", "Div", "Reciprocal", "Mul"}


def test_qdq_pairs_are_fp16_at_opset_19_and_stay_fp32_at_opset_17(calibrated_19, calibrated):
    """Opset 19 allows FP16 Q/DQ: the INT8 graph is FP16 around every pair (strongly typed TensorRT
    would otherwise run the layers between them in FP32); the default opset 17 (TensorRT 8.5) keeps
    them FP32."""
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    workdir, records = calibrated_19
    for module in ("vision", "audio", "decoder"):
        model = onnx.load(str(workdir / "int8" / f"{module}.onnx"))
        assert opset_of(model) == 19 and "QuantizeLinear" in {n.op_type for n in model.graph.node}, module
        assert _qdq_float_types(model) == ({F16}, {F16}), module
        _check_precision_graph(model, module)
        metrics = records[("calibrate-int8", module)].metrics
        assert metrics["qdq_float"] == "float16" and metrics["fp16_scales_clamped"] == 0, module
        assert metrics["gate"]["passed"] and metrics["accuracy"]["cosine_mean"] >= 0.99, (module, metrics["accuracy"])
        # FP16 around the pairs: only the FP32 islands (normalizations, softmax, the residual adds
        # feeding them) compute in FP32; at opset 17 nearly every float op does
        assert _fp32_op_types(model) <= ISLAND_OPS, (module, _fp32_op_types(model) - ISLAND_OPS)
    old_workdir, old_records = calibrated
    for module in ("vision", "audio", "decoder"):
        model = onnx.load(str(old_workdir / "int8" / f"{module}.onnx"))
        assert opset_of(model) == 17 and _qdq_float_types(model) == ({F32}, {F32}), module
        assert {"MatMul", "Reshape", "Transpose"} <= _fp32_op_types(model), module
        assert old_records[("calibrate-int8", module)].metrics["qdq_float"] == "float32", module


#: The tiny config's depth at widths that are not tiny powers of two: the 9B model's ratios
#: (vision 1536/13696, text 4096/13696 with 32 heads of 128) scaled to 96/856 and 192/642.
HIDDEN_SHAPED = {
    "checkpoint": None,  # new widths: seeded random weights
    "modules": ["vision", "embed", "decoder"],
    "vision": {"hidden_size": 96, "num_heads": 6, "intermediate_size": 856, "out_hidden_size": 192},
    "text": {"hidden_size": 192, "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 642},
    "export": {"batch_sizes": [1, 2]},
    "calibrate": {"batches": 4},
    "optimize": {"opset": 19},  # INT8 at its most FP16: FP16 around the Q/DQ pairs
}


def test_precision_check_passes_on_hidden_shaped_graphs(tmp_path):
    """Issue 18's acceptance on hidden-shaped graphs: export -> optimize -> calibrate --int8 and
    --fp16 (vision and decoder; embed feeds the decoder's prompts), every graph passing the
    graph-precision check and the calibrate gate."""
    cfg = load_config(write_config(tmp_path / "hidden.yaml", HIDDEN_SHAPED))
    quiet = Reporter(-1)
    Pipeline(cfg, tmp_path / "w", [ExportStage(), OptimizeStage()], cfg.modules, reporter=quiet).run()
    outcomes = Pipeline(cfg, tmp_path / "w", [CalibrateStage("int8"), CalibrateStage("fp16")], cfg.modules,
                        reporter=quiet).run()
    records = {(o.stage, o.module): o.record for o in outcomes}
    for precision in ("int8", "fp16"):
        for module in ("vision", "decoder"):
            model = onnx.load(str(tmp_path / "w" / precision / f"{module}.onnx"))
            _check_precision_graph(model, (precision, module))
            metrics = records[(f"calibrate-{precision}", module)].metrics
            assert metrics["gate"]["passed"] and metrics["accuracy"]["cosine_mean"] >= 0.99, (precision, module)
            if precision == "int8":
                assert _qdq_float_types(model) == ({onnx.TensorProto.FLOAT16}, {onnx.TensorProto.FLOAT16}), module


def test_fp16_vision_at_opset_23_keeps_the_fused_attention_fp16_with_fp32_softmax(tiny_build_copy, tmp_path):
    """optimize.opset 23 fuses the tower's attention; the FP16 graph converts the op whole (no FP32
    Softmax island between Casts) with ``softmax_precision`` FLOAT, and still meets the gate."""
    cfg = load_config(write_config(tmp_path / "c.yaml", {"optimize": {"opset": 23}}))
    outcomes = Pipeline(cfg, tiny_build_copy, [OptimizeStage(), CalibrateStage("fp16")], ["vision"],
                        reporter=Reporter(-1)).run()
    census = outcomes[-1].record.metrics["precision_census"]
    assert census["attention (fused)"] == {"fp16": 2} and census["softmax"] == {}
    model = onnx.load(str(tiny_build_copy / "fp16" / "vision.onnx"))
    _check_precision_graph(model, "vision fp16 opset 23")
    for node in (n for n in model.graph.node if n.op_type == "Attention"):
        assert {a.name: a.i for a in node.attribute if a.name == "softmax_precision"} == {"softmax_precision": 1}
    assert "Attention" not in _fp32_op_types(model) and "Softmax" not in _fp32_op_types(model)
