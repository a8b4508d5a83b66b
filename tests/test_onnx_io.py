"""autoglm_build/onnx_io.py: save_exported writes what loading the whole model and save_model wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoglm_build.onnx_io import save_exported, save_model


def _model() -> onnx.ModelProto:
    """Initializers on both sides of save_model's 1024-byte threshold and a constant in a node."""
    rng = np.random.default_rng(0)
    weights = {
        "w": rng.standard_normal((64, 248)).astype(np.float32),  # external
        "b247": rng.standard_normal(247).astype(np.float32),  # 988 bytes: stays in the graph
        "b248": rng.standard_normal(248).astype(np.float32),  # 992 bytes: external
        "w2": rng.standard_normal((248, 8)).astype(np.float32),
    }
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        rng.standard_normal(300).astype(np.float32)[:8], "c_value"))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b248"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        const,
        helper.make_node("Add", ["h3", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _raw(directory: Path, external: bool) -> Path:
    """The model as an exporter leaves it: one file per tensor (torch's large-model layout), or inline."""
    directory.mkdir()
    path = directory / "m.onnx"
    if external:
        onnx.save_model(_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=False,
                        size_threshold=0, convert_attribute=True)
    else:
        onnx.save_model(_model(), str(path))
    return path


def _stamp(model: onnx.ModelProto) -> None:
    prop = model.metadata_props.add()
    prop.key, prop.value = "stamp", "1"


@pytest.mark.parametrize("external", [True, False], ids=["raw-external", "raw-inline"])
@pytest.mark.parametrize("large_bytes", [0, 1 << 30], ids=["data-file", "one-file"])
def test_save_exported_writes_the_bytes_save_model_wrote(tmp_path, external, large_bytes):
    raw = _raw(tmp_path / "raw", external)
    whole = onnx.load(str(raw), load_external_data=True)
    _stamp(whole)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = save_model(whole, tmp_path / "old" / "g.onnx", large_bytes)
    new = save_exported(raw, tmp_path / "new" / "g.onnx", large_bytes, _stamp)
    assert [p.name for p in new] == [p.name for p in old] == (["g.onnx", "g.onnx.data"] if large_bytes == 0
                                                              else ["g.onnx"])
    assert [p.read_bytes() for p in new] == [p.read_bytes() for p in old]
    loaded = onnx.load(str(new[0]))
    assert {t.name: t.data_location for t in loaded.graph.initializer} == {
        "w": TensorProto.DEFAULT, "b247": TensorProto.DEFAULT, "b248": TensorProto.DEFAULT,
        "w2": TensorProto.DEFAULT}  # onnx.load read the external ones back
    if large_bytes == 0:
        inline = onnx.load(str(new[0]), load_external_data=False)
        assert {t.name for t in inline.graph.initializer if t.data_location == TensorProto.EXTERNAL} == {
            "w", "b248", "w2"}
