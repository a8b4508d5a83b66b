"""INT8 checks through ONNX Runtime compute the graph's numbers, not the host CPU's.

On x86 without VNNI, ONNX Runtime's default uint8 x int8 kernels saturate pairs of products at 16 bits
(PMADDUBSW): the tiny build's INT8 audio graph read max_rel 0.357 on such a CPU and 0.024 on a VNNI one.
The graph below saturates on every pair; on a CPU without the problem (VNNI, ARM) it passes either way.
"""

from __future__ import annotations

import numpy as np
import pytest

from autoglm_build.onnx_io import ort_options
from autoglm_build.stages import calibrate
from autoglm_build.verify import _ort_run

K, N = 64, 8


def _qdq_matmul(path):
    """y = DQ(Q(x)) @ DQ(w): scale 1, zero point 0, int8 weights all 127 (per output channel)."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    graph = h.make_graph(
        [h.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
         h.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
         h.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
         h.make_node("MatMul", ["xd", "wd"], ["y"])],
        "qdq_matmul",
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", K])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", N])],
        [nh.from_array(np.array(1.0, np.float32), "s"), nh.from_array(np.array(0, np.int8), "z"),
         nh.from_array(np.full((K, N), 127, np.int8), "wq"), nh.from_array(np.ones(N, np.float32), "ws"),
         nh.from_array(np.zeros(N, np.int8), "wz")])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_verify_runs_int8_matmuls_exactly_on_any_cpu(tmp_path):
    path = _qdq_matmul(tmp_path / "m.onnx")
    x = np.full((2, K), 127.0, np.float32)  # int8 127 (uint8 255 inside ONNX Runtime): every pair saturates
    (out,) = _ort_run(path)([{"x": x}])
    np.testing.assert_array_equal(out["y"], np.full((2, N), K * 127 * 127, np.float32))


def test_calibration_accuracy_uses_the_exact_options(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    seen = []
    real = ort.InferenceSession

    def spy(path, opts=None, **kw):
        seen.append(opts.get_session_config_entry("session.x64quantprecision"))
        return real(path, opts, **kw)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    path = _qdq_matmul(tmp_path / "m.onnx")

    class Spec:
        def output_names(self, cfg):
            return ["y"]

    class Cfg:
        class export:
            large_model_bytes = 1 << 30

    import onnx

    x = np.full((2, K), 127.0, np.float32)
    result = calibrate.accuracy(Spec(), Cfg(), path, onnx.load(str(path)), [{"x": x}], tmp_path)
    assert seen == ["1", "1"] and result["max_abs"] == 0.0


def test_options_are_the_exact_ones():
    assert ort_options().get_session_config_entry("session.x64quantprecision") == "1"
    assert ort_options(threads=3).intra_op_num_threads == 3
