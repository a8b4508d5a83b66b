"""precision: TensorRT's calibration cache header per version and method."""

from __future__ import annotations

import numpy as np
import pytest

from autoglm_build.precision import read_trt_cache, trt_cache_header, trt_version_number, write_trt_cache


@pytest.mark.parametrize("version, number", [
    ("8.5.3", 8503), ("8.6.1", 8601), ("9.3.0", 9300),  # major*1000 + minor*100 + patch below 10
    ("10.0.1", 100001), ("10.3.0", 100300), ("10.13", 101300),  # major*10000 + ... from 10.0
])
def test_version_number_is_nv_tensorrt_version(version, number):
    assert trt_version_number(version) == number


@pytest.mark.parametrize("version, method, header", [
    ("8.5.3", "entropy", "TRT-8503-EntropyCalibration2"),
    ("8.5.3", "minmax", "TRT-8503-MinMaxCalibration"),
    ("8.5.3", "percentile", "TRT-8503-LegacyCalibration"),
    ("10.3.0", "entropy", "TRT-100300-EntropyCalibration2"),
    ("10.3.0", "minmax", "TRT-100300-MinMaxCalibration"),
    ("10.13.0", "percentile", "TRT-101300-LegacyCalibration"),
])
def test_cache_header_per_version_and_method(version, method, header):
    assert trt_cache_header(version, method) == header


def test_no_cache_header_for_tensorrt_11():
    with pytest.raises(ValueError, match="TensorRT <= 10"):
        trt_cache_header("11.1.0", "entropy")


def test_cache_round_trips(tmp_path):
    path = tmp_path / "m.calib.cache"
    written = write_trt_cache(path, {"x": (-2.54, 1.0), "zero": (0.0, 0.0)}, trt_cache_header("10.3.0", "minmax"))
    header, scales = read_trt_cache(path)
    assert written == 1 and header == "TRT-100300-MinMaxCalibration"
    assert scales == {"x": pytest.approx(2.54 / 127)}


# ---- FP32 islands and the FP16 KV boundary -------------------------------------------------------

def _rmsnorm_block(hidden: int = 64):
    """``h = x + r; y = RMSNorm(h) @ W`` as transformers' RMSNorm exports (Pow, ReduceMean, Add(eps),
    Sqrt, Div(1, .), Mul(h, .), Mul(w)), plus a Softmax and a KV-style input concatenated into an output."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.ones(hidden, np.float32), "w"),
        numpy_helper.from_array((rng.standard_normal((hidden, hidden)) / 8).astype(np.float32), "W"),
    ]
    nodes = [
        helper.make_node("Add", ["x", "r"], ["h"], name="/layers.0/residual/Add"),
        helper.make_node("Pow", ["h", "two"], ["sq"], name="/layers.0/norm/Pow"),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1, name="/layers.0/norm/ReduceMean"),
        helper.make_node("Add", ["ms", "eps"], ["mse"], name="/layers.0/norm/Add"),
        helper.make_node("Sqrt", ["mse"], ["rms"], name="/layers.0/norm/Sqrt"),
        helper.make_node("Div", ["one", "rms"], ["inv"], name="/layers.0/norm/Div"),
        helper.make_node("Mul", ["h", "inv"], ["normed"], name="/layers.0/norm/Mul"),
        helper.make_node("Mul", ["normed", "w"], ["scaled"], name="/layers.0/norm/Mul_1"),
        helper.make_node("MatMul", ["scaled", "W"], ["proj"], name="/layers.0/proj/MatMul"),
        helper.make_node("Softmax", ["proj"], ["y"], axis=-1, name="/layers.0/Softmax"),
        helper.make_node("Concat", ["past", "proj"], ["present"], axis=1, name="/layers.0/Concat"),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "block",
        [helper.make_tensor_value_info("x", f32, [2, hidden]), helper.make_tensor_value_info("r", f32, [2, hidden]),
         helper.make_tensor_value_info("past", f32, [2, "p"])],
        [helper.make_tensor_value_info("y", f32, [2, hidden]),
         helper.make_tensor_value_info("present", f32, [2, None])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model, feed):
    import onnxruntime as ort

    from autoglm_build.onnx_io import feed_for, ort_options

    session = ort.InferenceSession(model.SerializeToString(), ort_options(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed_for(session, feed))))


def test_fp32_nodes_are_the_normalization_the_softmax_and_the_residual_add():
    from autoglm_build.precision import fp32_nodes

    kept = set(fp32_nodes(_rmsnorm_block()))
    assert kept == {"/layers.0/residual/Add", "/layers.0/norm/Pow", "/layers.0/norm/ReduceMean",
                    "/layers.0/norm/Add", "/layers.0/norm/Sqrt", "/layers.0/norm/Div", "/layers.0/norm/Mul",
                    "/layers.0/Softmax"}


def test_fp16_graph_keeps_reductions_fp32_where_naive_fp16_overflows():
    """A residual stream of |x| ~ 1000 (GLM's towers reach that): x^2 overflows FP16 (65504).
    Without the fix, ``to_fp16`` was the naive conversion."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from autoglm_build.precision import fp16_reductions, to_fp16

    rng = np.random.default_rng(1)
    feed = {"x": (rng.standard_normal((2, 64)) * 600).astype(np.float32),
            "r": (rng.standard_normal((2, 64)) * 600).astype(np.float32),
            "past": rng.standard_normal((2, 3)).astype(np.float32)}
    ref = _run(_rmsnorm_block(), feed)["y"]
    naive = convert_float_to_float16(_rmsnorm_block(), keep_io_types=True)
    assert fp16_reductions(naive)  # the check sees the old policy's FP16 Pow/ReduceMean/Softmax
    # What a strongly typed engine would compute there (ONNX Runtime's CPU kernels widen FP16 to FP32
    # inside, so the overflow is shown in numpy): the square of the residual stream is inf in FP16.
    with np.errstate(over="ignore"):  # the overflow is the point
        assert np.isinf(np.square((feed["x"] + feed["r"]).astype(np.float16))).any()
    ours = to_fp16(_rmsnorm_block())
    assert fp16_reductions(ours) == []
    assert np.allclose(_run(ours, feed)["y"], ref, atol=2e-3)


def test_kv_io_becomes_fp16_without_cast_round_trips():
    from autoglm_build.precision import fp16_islands, to_fp16

    for convert in (lambda m: to_fp16(m, ["past", "present"]),
                    lambda m: fp16_islands(m, ["/layers.0/proj/MatMul"], ["past", "present"])):
        model = convert(_rmsnorm_block())
        types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
        assert types == {"x": 1, "r": 1, "past": 10, "y": 1, "present": 10}
        producers = {o: n for n in model.graph.node for o in n.output}
        for node in model.graph.node:  # no Cast fed by a Cast back to the type it started from
            first = producers.get(node.input[0]) if node.op_type == "Cast" else None
            assert not (first is not None and first.op_type == "Cast" and
                        next(a.i for a in first.attribute if a.name == "to") != next(a.i for a in node.attribute
                                                                                if a.name == "to")), node.name
        rng = np.random.default_rng(2)
        feed = {"x": rng.standard_normal((2, 64)).astype(np.float32),
                "r": rng.standard_normal((2, 64)).astype(np.float32),
                "past": rng.standard_normal((2, 3)).astype(np.float16)}
        out = _run(model, feed)
        assert out["present"].dtype == np.float16 and out["present"].shape == (2, 67)
        assert np.array_equal(out["present"][:, :3], feed["past"])  # the cache passes through exactly


def test_fp16_io_survives_onnx_graphsurgeon():
    """The engine stage's rewrite for TensorRT 8.5 goes through onnx-graphsurgeon, which merges
    value_info into I/O types: a stale FP32 entry for an FP16 output made the engine's present_* FP32."""
    import onnx_graphsurgeon as gs

    from autoglm_build.precision import to_fp16

    block = _rmsnorm_block()
    block.graph.value_info.extend(block.graph.output)  # as onnxslim leaves an optimized graph
    model = to_fp16(block, ["past", "present"])
    outputs = {o.name: o.dtype for o in gs.import_onnx(model).outputs}
    assert outputs == {"y": np.float32, "present": np.float16}


# ---- FP16 around the Q/DQ pairs (opset >= 19) ----------------------------------------------------

def _qdq_block(opset: int, hidden: int = 64):
    """:func:`_rmsnorm_block` with its MatMul in INT8 as ``quantize_static`` writes it: per-tensor Q/DQ
    on the activation, per-channel Q/DQ on the weight, whose last column is all zeros (scale 1e-9:
    below FP16's smallest subnormal, it would round to a zero scale)."""
    from onnx import helper, numpy_helper

    from autoglm_build.stages.optimize import upgrade_opset

    model = _rmsnorm_block(hidden)
    weights = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W")).copy()
    weights[:, -1] = 0.0
    scales = np.abs(weights).max(axis=0) / 127
    scales[-1] = 1e-9
    inits = {t.name: t for t in model.graph.initializer}
    inits["W"].CopyFrom(numpy_helper.from_array(weights.astype(np.float32), "W"))
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array(0.05, np.float32), "s_x"),
        numpy_helper.from_array(np.array(0, np.int8), "z_x"),
        numpy_helper.from_array(scales.astype(np.float32), "s_W"),
        numpy_helper.from_array(np.zeros(hidden, np.int8), "z_W"),
    ])
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    at = list(model.graph.node).index(matmul)
    qdq = [
        helper.make_node("QuantizeLinear", ["scaled", "s_x", "z_x"], ["scaled_q"], name="scaled_QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["scaled_q", "s_x", "z_x"], ["scaled_dq"], name="scaled_DequantizeLinear"),
        helper.make_node("QuantizeLinear", ["W", "s_W", "z_W"], ["W_q"], axis=1, name="W_QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["W_q", "s_W", "z_W"], ["W_dq"], axis=1, name="W_DequantizeLinear"),
    ]
    for i, node in enumerate(qdq):
        model.graph.node.insert(at + i, node)
    matmul.input[:] = ["scaled_dq", "W_dq"]
    return upgrade_opset(model, opset) if opset > 17 else model  # as the optimize stage raises it


def _qdq_types(model):
    """(element types QuantizeLinear reads, element types DequantizeLinear gives)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    reads = {types.get(n.input[i]) for n in model.graph.node if n.op_type == "QuantizeLinear" for i in (0, 1)}
    gives = {types.get(n.output[0]) for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return reads, gives


def test_fp16_around_qdq_at_opset_19_keeps_the_fp32_islands_and_clamps_a_zero_scale():
    import onnx

    from autoglm_build.precision import FP16_SCALE_RANGE, fp16_around_qdq, fp16_reductions

    rng = np.random.default_rng(3)
    feed = {"x": rng.standard_normal((2, 64)).astype(np.float32), "r": rng.standard_normal((2, 64)).astype(np.float32),
            "past": rng.standard_normal((2, 3)).astype(np.float32)}
    ref = _run(_qdq_block(19), feed)  # the FP32 Q/DQ graph
    model, clamped = fp16_around_qdq(_qdq_block(19), ["past", "present"])
    assert _qdq_types(_qdq_block(19)) == ({1}, {1})
    assert _qdq_types(model) == ({10}, {10})  # FP16 into every Q, out of every DQ, FP16 scales
    assert clamped == 1  # the all-zero column's 1e-9
    scale = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "s_W"))
    assert scale.dtype == np.float16 and scale.min() == np.float16(FP16_SCALE_RANGE[0])
    assert fp16_reductions(model) == []
    names, outputs = [n.name for n in model.graph.node], [o for n in model.graph.node for o in n.output]
    assert len(set(names)) == len(names) and len(set(outputs)) == len(outputs)
    onnx.checker.check_model(model, full_check=True)
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    assert types == {"x": 1, "r": 1, "past": 10, "y": 1, "present": 10}
    got = _run(model, {**feed, "past": feed["past"].astype(np.float16)})
    assert np.isfinite(got["y"]).all() and np.allclose(got["y"], ref["y"], atol=2e-3)
    assert np.allclose(got["present"], ref["present"], atol=2e-2, rtol=2e-3)


def test_fp16_around_qdq_refuses_opsets_whose_qdq_are_fp32_only():
    from autoglm_build.precision import fp16_around_qdq

    with pytest.raises(ValueError, match="needs opset >= 19"):
        fp16_around_qdq(_qdq_block(17))


def _attention_block():
    """``y = Attention(q·Wq, k, v, mask)`` at opset 23 with no ``softmax_precision`` (what an exporter
    emitting the op writes), the additive mask keeping two images of a pack apart."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    nodes = [helper.make_node("MatMul", ["q", "Wq"], ["qw"]),
             helper.make_node("Attention", ["qw", "k", "v", "mask"], ["y"], scale=0.25, name="attn")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, "s", 16]) for n in "qkv"]
    io.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, "s", "s"]))
    graph = helper.make_graph(nodes, "attention", io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array((rng.standard_normal((16, 16)) / 4).astype(np.float32), "Wq")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def test_fused_attention_goes_fp16_whole_with_its_softmax_fp32():
    """Issue 18's guarantee inside the fused op: FP16 Q/K/V/mask, ``softmax_precision`` FLOAT, no
    Cast-delimited FP32 island (which would break TensorRT's attention pattern); the check reports
    an FP16 ``Attention`` whose softmax is not FP32."""
    from autoglm_build.precision import fp16_islands, fp16_reductions, softmax_in_fp32, to_fp16

    rng = np.random.default_rng(6)
    seg = np.repeat([0, 1], [5, 3])
    feed = {n: rng.standard_normal((1, 2, 8, 16)).astype(np.float32) for n in "qkv"}
    feed["mask"] = np.where(seg[:, None] == seg[None, :], 0, np.finfo(np.float32).min).astype(np.float32)[None, None]
    ref = _run(_attention_block(), feed)["y"]
    for model in (to_fp16(_attention_block()), fp16_islands(_attention_block(), ["attn", "MatMul_0"])):
        (attn,) = [n for n in model.graph.node if n.op_type == "Attention"]
        assert {a.name: a.i for a in attn.attribute if a.name == "softmax_precision"} == {"softmax_precision": 1}
        types = _tensor_types(model)
        assert {types[i] for i in attn.input} == {10} and types[attn.output[0]] == 10  # FP16 whole
        assert fp16_reductions(model) == [] and "Softmax" not in {n.op_type for n in model.graph.node}
        assert np.allclose(_run(model, feed)["y"], ref, atol=5e-3)
        del attn.attribute[:]
        assert fp16_reductions(model) == ["Attention attn"]
        assert softmax_in_fp32(model) == 1 and fp16_reductions(model) == []


def _tensor_types(model):
    from autoglm_build.precision import _tensor_types as types

    return types(model)
