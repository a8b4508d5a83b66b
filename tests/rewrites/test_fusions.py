"""Each rewrite on the pattern it names, built by hand: op counts before/after, same numbers in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from autoglm_build.rewrites import Cleanup, FuseGelu, FuseRMSNorm


def _model(nodes, inits, opset, hidden=8):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, hidden])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]


def _ops(model):
    return [n.op_type for n in model.graph.node]


def gelu_pattern(opset):
    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["x", "a"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["y"])]
    return _model(nodes, {"sqrt2": 1.4142135, "one": 1.0, "half": 0.5}, opset)


def test_fuse_gelu_into_standard_gelu():
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    model = gelu_pattern(20)
    fused, count = FuseGelu()(model)
    assert count == 1 and _ops(fused) == ["Gelu"]
    np.testing.assert_allclose(_run(fused, x), _run(model, x), atol=1e-6)


def test_fusions_skip_below_their_opset():
    assert "needs opset >= 20" in FuseGelu().skip_reason(17)
    assert "needs opset >= 23" in FuseRMSNorm().skip_reason(20)
    assert FuseRMSNorm().skip_reason(23) is None


def rmsnorm_pattern(weight: bool):
    nodes = [helper.make_node("Pow", ["x", "two"], ["p"]),
             helper.make_node("ReduceMean", ["p", "axes"], ["r"], keepdims=1),
             helper.make_node("Add", ["r", "eps"], ["a"]), helper.make_node("Sqrt", ["a"], ["s"]),
             helper.make_node("Div", ["one", "s"], ["inv"]),
             helper.make_node("Mul", ["x", "inv"], ["n" if weight else "y"])]
    inits = {"two": 2.0, "eps": 1e-5, "one": 1.0}
    if weight:
        nodes.append(helper.make_node("Mul", ["n", "w"], ["y"]))
        inits["w"] = np.linspace(0.5, 1.5, 8)
    model = _model(nodes, inits, 23)
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes"))
    return model


def test_fuse_rmsnorm_with_and_without_weight():
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32) * 3
    for weight in (True, False):
        model = rmsnorm_pattern(weight)
        model = onnx.shape_inference.infer_shapes(model)
        fused, count = FuseRMSNorm()(model)
        assert count == 1 and _ops(fused) == ["RMSNormalization"], _ops(fused)
        np.testing.assert_allclose(_run(fused, x), _run(model, x), rtol=1e-5, atol=1e-6)


def test_cleanup_folds_constants_and_drops_dead_nodes(tiny_build):
    model = onnx.load(str(tiny_build / "onnx" / "decoder.onnx"))
    slim, removed = Cleanup()(model)
    assert removed > 300 and "Constant" not in _ops(slim) and "Identity" not in _ops(slim)


def test_decompose_layernorm_computes_the_same():
    from autoglm_build.rewrites import DecomposeLayerNorm

    nodes = [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1, epsilon=1e-5)]
    model = _model(nodes, {"s": np.linspace(0.5, 1.5, 8), "b": np.linspace(-1, 1, 8)}, 17)
    x = np.random.default_rng(2).standard_normal((2, 3, 8)).astype(np.float32) * 4 + 1
    out, count = DecomposeLayerNorm()(model)
    assert count == 1 and "LayerNormalization" not in _ops(out)
    np.testing.assert_allclose(_run(out, x), _run(model, x), rtol=1e-5, atol=1e-5)


def test_cleanup_of_a_large_graph_with_layernorms_holds_its_weights_aside(tiny_build, monkeypatch):
    """The tiny audio encoder (LayerNorms, like Whisper-large-v3's 2.7 GB one) treated as over the 2 GB that
    onnxslim's fallback shape inference cannot serialize: cleaned with its weights held aside, it computes
    what the exported graph does, its weights back in place, and folds as much as without holding."""
    from autoglm_build.rewrites import cleanup

    path = tiny_build / "onnx" / "audio.onnx"
    weights = {t.name: bytes(t.raw_data) for t in onnx.load(str(path)).graph.initializer if len(t.raw_data) > 1024}
    assert any(n.op_type == "LayerNormalization" for n in onnx.load(str(path)).graph.node) and weights
    plain, plain_removed = Cleanup()(onnx.load(str(path)))
    monkeypatch.setattr(cleanup, "PROTOBUF_SAFE_BYTES", 0)
    monkeypatch.setattr(cleanup, "HELD_WEIGHT_BYTES", 1024)
    calls = []
    real = cleanup.hold_large_initializers

    def hold(model, limit, only):
        calls.append((limit, len(only)))
        return real(model, limit, only)

    monkeypatch.setattr(cleanup, "hold_large_initializers", hold)
    held, removed = Cleanup()(onnx.load(str(path)))
    assert calls and calls[0][0] == 1024 and calls[0][1] > 0 and removed == plain_removed
    kept = {t.name: t for t in held.graph.initializer}
    for name, raw in weights.items():  # every weight onnxslim kept is back, bytes and all, none left external
        if name in kept:
            assert kept[name].raw_data == raw and not kept[name].external_data, name
    feed = {i.name: np.random.default_rng(0).standard_normal(  # 2 clips of 400 mel frames
        [d.dim_value or (2 if k == 0 else 400) for k, d in enumerate(i.type.tensor_type.shape.dim)]).astype(np.float32)
        for i in held.graph.input}
    want = ort.InferenceSession(plain.SerializeToString()).run(None, feed)
    got = ort.InferenceSession(held.SerializeToString()).run(None, feed)
    for a, b in zip(want, got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cleanup_holds_only_weights_that_matmul_gather_or_conv_read(monkeypatch):
    """A large initializer that an Add reads stays in the graph while onnxslim runs (its dead-node elimination
    reads such operands' values: a held one failed there); the MatMul's weight is held and comes back."""
    from autoglm_build.rewrites import cleanup

    rng = np.random.default_rng(0)
    w, bias = rng.standard_normal((8, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "bias"], ["a"]),
             helper.make_node("LayerNormalization", ["a", "g", "b"], ["y"], axis=-1)]
    model = _model(nodes, {"w": w, "bias": bias, "g": np.ones(8), "b": np.zeros(8)}, 17)
    assert cleanup.weight_only_initializers(model) == {"w"}
    monkeypatch.setattr(cleanup, "PROTOBUF_SAFE_BYTES", 0)
    monkeypatch.setattr(cleanup, "HELD_WEIGHT_BYTES", 64)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    want = _run(model, x)
    slim, _ = Cleanup()(model)
    kept = {t.name: numpy_helper.to_array(t) for t in slim.graph.initializer}
    np.testing.assert_array_equal(kept["w"], w)
    np.testing.assert_allclose(_run(slim, x), want, rtol=1e-6, atol=1e-6)
