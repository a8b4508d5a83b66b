"""QDQOnlyOnQuantizedOps: the float consumers of a quantized tensor read the float tensor."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from autoglm_build.rewrites import QDQOnlyOnQuantizedOps


def run_onnx(model, feed):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _graph():
    """x -> Q/DQ -> MatMul(w) and the same DQ -> Sigmoid (what onnxruntime.quantization writes)."""
    inits = [numpy_helper.from_array(np.full((), 0.02, np.float32), "s"),
             numpy_helper.from_array(np.zeros((), np.int8), "z"),
             numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xdq"], name="dq"),
             helper.make_node("MatMul", ["xdq", "w"], ["y"], name="mm"),
             helper.make_node("Sigmoid", ["xdq"], ["g"], name="sig")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_float_consumers_read_the_float_tensor_and_the_int8_layer_keeps_its_pair():
    model, before = _graph(), _graph()
    model, count = QDQOnlyOnQuantizedOps(["MatMul", "Gemm", "Conv"])(model)
    assert count == 1
    onnx.checker.check_model(model)
    by_name = {n.name: n for n in model.graph.node}
    assert list(by_name["sig"].input) == ["x"] and list(by_name["mm"].input) == ["xdq", "w"]
    x = np.random.default_rng(1).uniform(-1, 1, (2, 4)).astype(np.float32)
    y, g = run_onnx(model, {"x": x})
    y0, g0 = run_onnx(before, {"x": x})
    np.testing.assert_array_equal(y, y0)  # the INT8 layer is unchanged
    np.testing.assert_allclose(g, 1 / (1 + np.exp(-x)), rtol=1e-6)  # no quantization error in the float op
    assert np.abs(g0 - g).max() > 0  # before, the sigmoid saw the quantized x


def test_unused_pairs_and_their_scales_are_dropped():
    model, count = QDQOnlyOnQuantizedOps(["Sigmoid"])(_graph())
    assert count == 1 and [n.op_type for n in model.graph.node].count("QuantizeLinear") == 1  # Sigmoid reads it
    model, count = QDQOnlyOnQuantizedOps(["Conv"])(_graph())
    assert count == 2
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    assert {t.name for t in model.graph.initializer} == {"w"}


def test_names_read_inside_a_subgraph_are_kept():
    model = _graph()
    then = helper.make_graph([helper.make_node("Identity", ["w"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4, 3])])
    cond = numpy_helper.from_array(np.array(True), "c")
    model.graph.initializer.append(cond)
    model.graph.node.append(helper.make_node("If", ["c"], ["o"], then_branch=then, else_branch=then, name="if"))
    model.graph.output.append(helper.make_tensor_value_info("o", TensorProto.FLOAT, [4, 3]))
    model.graph.node.remove(next(n for n in model.graph.node if n.name == "mm"))
    model.graph.output.remove(next(o for o in model.graph.output if o.name == "y"))
    model, _ = QDQOnlyOnQuantizedOps(["Conv"])(model)
    assert "w" in {t.name for t in model.graph.initializer}  # read only by the If's branches
    onnx.checker.check_model(model)


def test_a_quantized_graph_output_becomes_the_float_tensor():
    """onnxruntime.quantization may leave a graph output as DQ(Q(x)) (the vision tower's last MatMul writes
    ``image_embeds``): the output is x itself, under its own name."""
    inits = [numpy_helper.from_array(np.full((), 0.02, np.float32), "s"),
             numpy_helper.from_array(np.zeros((), np.int8), "z"),
             numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y_float"], name="mm"),
             helper.make_node("QuantizeLinear", ["y_float", "s", "z"], ["yq"], name="q"),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"], name="dq")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model, count = QDQOnlyOnQuantizedOps(["MatMul", "Gemm", "Conv"])(model)
    assert count == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul"] and list(model.graph.node[0].output) == ["y"]
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    (y,) = run_onnx(model, {"x": x})
    np.testing.assert_allclose(y, x @ numpy_helper.to_array(inits[2]), rtol=1e-6)
