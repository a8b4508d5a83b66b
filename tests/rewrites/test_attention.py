"""The attention rewrites on the tiny exported graphs (a pack of two images of different sizes; a
left-padded prefill and a decode step) and on hand-built patterns: what changes, and that ONNX
Runtime computes the same numbers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoglm_build.modules import registry
from autoglm_build.modules.vision import CASE_SIZES
from autoglm_build.rewrites import Cleanup, FuseAttention, ScaleQueryFirst
from autoglm_build.stages.optimize import upgrade_opset


@pytest.fixture(scope="module")
def cleaned(tiny_build):
    """The tiny vision tower and decoder as optimize's cleanup leaves them (opset 17)."""
    return {m: Cleanup()(onnx.load(str(tiny_build / "onnx" / f"{m}.onnx")))[0] for m in ("vision", "decoder")}


@pytest.fixture(scope="module")
def feeds():
    from autoglm_build.config import load_config
    from tests.conftest import TINY

    cfg, rng = load_config(TINY), np.random.default_rng(12)
    decoder = registry.get("decoder")
    return {
        "vision": [registry.get("vision").random_images(cfg, rng, [CASE_SIZES[1], CASE_SIZES[2]])],
        "decoder": [decoder.step_inputs(cfg, rng, 2, 7, past=0, pad=2),  # a left-padded prefill, then a decode step
                    decoder.step_inputs(cfg, rng, 2, 1, past=9, pad=2)],
    }


def _run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})


def _assert_same(model, reference, feeds, atol=1e-5):
    for feed in feeds:
        for got, want in zip(_run(model, feed), _run(reference, feed)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


def _ops(model):
    return Counter(n.op_type for n in model.graph.node)


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


@pytest.mark.parametrize("module", ["vision", "decoder"])
def test_scale_query_first_scales_q_before_the_first_matmul(cleaned, feeds, module):
    model = cleaned[module]
    moved, count = ScaleQueryFirst()(model)
    assert count == 2  # one per layer of the tiny config
    assert _ops(moved)["Mul"] == _ops(model)["Mul"] and _ops(moved)["Softmax"] == 2
    producers = _producers(moved)
    for softmax in (n for n in moved.graph.node if n.op_type == "Softmax"):
        add = producers[softmax.input[0]]
        bmm1 = next(producers[i] for i in add.input if i in producers and producers[i].op_type == "MatMul")
        assert producers[bmm1.input[0]].op_type == "Mul"  # Q·scale, not (Q·Kᵀ)·scale
    _assert_same(moved, model, feeds[module])


def test_fuse_attention_fuses_the_vision_tower_into_standard_attention(cleaned, feeds):
    model = upgrade_opset(cleaned["vision"], 23)
    fused, count = FuseAttention()(model)
    assert count == 2 and _ops(fused)["Attention"] == 2 and "Softmax" not in _ops(fused)
    onnx.checker.check_model(fused, full_check=True)
    producers = _producers(fused)
    for node in (n for n in fused.graph.node if n.op_type == "Attention"):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"scale": 0.25, "softmax_precision": TensorProto.FLOAT}  # 1/sqrt(16), FP32 softmax
        assert producers[node.input[3]].op_type == "Unsqueeze"  # the images' block-diagonal mask, 4-D
    _assert_same(fused, model, feeds["vision"])


def test_fuse_attention_leaves_the_decoder_whose_padding_rows_are_fully_masked(cleaned):
    model = upgrade_opset(cleaned["decoder"], 23)
    fused, count = FuseAttention()(model)
    assert count == 0 and _ops(fused)["Softmax"] == 2 and "Attention" not in _ops(fused)


def test_onnx_runtime_attention_zeroes_a_fully_masked_row_where_softmax_averages():
    """Why the decoder stays unfused: on a row with nothing to attend to, the unfused graph's
    softmax averages V while ONNX Runtime's ``Attention`` returns 0 (the left-padding rows)."""
    big = np.finfo(np.float32).min
    q = k = np.ones((1, 1, 2, 4), np.float32)
    v = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4)
    mask = np.array([big, big, 0, 0], np.float32).reshape(1, 1, 2, 2)
    scores = (q @ k.transpose(0, 1, 3, 2)).astype(np.float64) + mask
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    unfused = (weights / weights.sum(-1, keepdims=True)) @ v
    node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], scale=1.0)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 2, s]) for n, s in zip("qkvm", (4, 4, 4, 2))]
    graph = helper.make_graph([node], "g", io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    fused = _run(model, {"q": q, "k": k, "v": v, "m": mask})[0]
    np.testing.assert_allclose(fused[0, 0, 1], unfused[0, 0, 1], rtol=1e-6)  # rows with something to see agree
    assert np.allclose(unfused[0, 0, 0], v[0, 0].mean(0)) and not np.allclose(fused[0, 0, 0], unfused[0, 0, 0])


def gqa_pattern(heads=4, kv_heads=2, seq=5, dim=8):
    """transformers' eager attention with ``repeat_kv`` on K and V, no mask, scale 1/sqrt(dim)."""
    group = heads // kv_heads
    nodes = []
    for name in ("k", "v"):
        nodes += [helper.make_node("Unsqueeze", [name, "axis2"], [f"{name}5"]),
                  helper.make_node("Expand", [f"{name}5", "wide"], [f"{name}x"]),
                  helper.make_node("Reshape", [f"{name}x", "heads"], [f"{name}r"])]
    nodes += [helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["ss"]),
              helper.make_node("Softmax", ["ss"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vr"], ["y"])]
    consts = {"axis2": np.array([2]), "wide": np.array([1, kv_heads, group, seq, dim]),
              "heads": np.array([1, heads, seq, dim]), "scale": np.array(dim ** -0.5, dtype=np.float32)}
    info = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, heads, seq, dim])]
    info += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, kv_heads, seq, dim]) for n in "kv"]
    graph = helper.make_graph(nodes, "gqa", info, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


def test_fuse_attention_takes_grouped_query_heads_without_repeat_kv():
    model = gqa_pattern()
    fused, count = FuseAttention()(model)
    assert count == 1 and [n.op_type for n in fused.graph.node] == ["Attention"]
    assert list(fused.graph.node[0].input) == ["q", "k", "v"]  # 4 query heads over 2 KV heads
    rng = np.random.default_rng(3)
    feed = {"q": rng.standard_normal((1, 4, 5, 8), np.float32), "k": rng.standard_normal((1, 2, 5, 8), np.float32),
            "v": rng.standard_normal((1, 2, 5, 8), np.float32)}
    np.testing.assert_allclose(_run(fused, feed)[0], _run(model, feed)[0], rtol=1e-5, atol=1e-6)


def test_attention_rewrites_are_gated_by_opset():
    assert "needs opset >= 23" in FuseAttention().skip_reason(20)
    assert FuseAttention().skip_reason(23) is None
    assert ScaleQueryFirst().skip_reason(14) is None  # TensorRT 8.5's opset 17 reads it


def test_large_initializers_stay_out_of_graphsurgeon_and_come_back(cleaned, monkeypatch):
    """Protobuf cannot copy a message over 2 GB (the 9B's FP32 LM head is 2.5 GB: "Failed to serialize
    proto" on the GPU machine), so a rewrite holds large initializers' bytes aside while onnx-graphsurgeon
    copies the graph. With nearly every weight held, the rewritten model is byte for byte the one
    rewritten with all weights inside, and the input model is left as it was."""
    from autoglm_build.rewrites import base

    model = cleaned["decoder"]
    before = model.SerializeToString()
    whole, count = ScaleQueryFirst()(onnx.load_from_string(before))
    monkeypatch.setattr(base, "LARGE_INITIALIZER_BYTES", 1000)
    held = base.hold_large_initializers(onnx.load_from_string(before))
    assert len(held) > 10
    rewritten, held_count = ScaleQueryFirst()(model)
    assert held_count == count > 0
    assert rewritten.SerializeToString() == whole.SerializeToString()
    assert model.SerializeToString() == before


def test_a_held_initializer_is_no_constant_to_a_rewrite(cleaned, monkeypatch):
    """A rewrite asking for a held weight's values gets None (not a scalar, nothing to fold), not an
    error about its placeholder location."""
    import onnx_graphsurgeon as gs

    from autoglm_build.rewrites import base

    monkeypatch.setattr(base, "LARGE_INITIALIZER_BYTES", 1000)
    model = onnx.load_from_string(cleaned["decoder"].SerializeToString())
    held = base.hold_large_initializers(model)
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    assert all(base.constant(tensors[name]) is None for name in held)
    small = next(t for t in tensors.values() if isinstance(t, gs.Constant) and t.name not in held)
    assert base.constant(small) is not None
