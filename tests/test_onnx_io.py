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


ARENA_SCRIPT = r"""
import json, sys
import numpy as np
import onnx
from onnx import TensorProto, helper
import onnxruntime as ort
from autoglm_build import onnx_io

shared = sys.argv[2] == "shared"  # else ONNX Runtime's default: every session its own arena
n = 4000  # x [n, 16] @ x^T: a [n, n] float activation (61 MiB) and its softmax, then a sum
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "xt"], ["s"]),
         helper.make_node("Softmax", ["s"], ["p"], axis=-1),
         helper.make_node("ReduceSum", ["p", "ax"], ["y"], keepdims=0)]
axis = helper.make_tensor("ax", TensorProto.INT64, [1], [1])
model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [axis]),
                          opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
onnx.save(model, sys.argv[1])
sessions = [ort.InferenceSession(sys.argv[1], onnx_io.ort_options(shared=shared), providers=["CPUExecutionProvider"])
            for _ in range(6)]  # a staged module's six stages, alive at once, run one after another
def peak_kib():  # this process's own peak (VmHWM): ru_maxrss carries the parent's peak across fork and exec
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))


before = peak_kib()
for session in sessions:
    session.run(None, {"x": np.random.default_rng(0).random((n, 16), dtype=np.float32)})
peak = peak_kib()
print(json.dumps({"shared": bool(onnx_io._SHARED_ARENA), "grew_mib": (peak - before) / 1024}))
"""


def test_sessions_share_one_cpu_arena_so_a_staged_modules_peaks_do_not_add_up(tmp_path):
    """Six sessions run one after another (a staged vision tower's stages in verify): with the process's one
    shared arena the memory grows by about one session's activations; with an arena each (ONNX Runtime's
    default) it grows by six, which at the 9B's screenshot was 176 GB and the OOM killer."""
    import json
    import subprocess
    import sys

    grew = {}
    for mode in ("shared", "separate"):
        out = subprocess.run([sys.executable, "-c", ARENA_SCRIPT, str(tmp_path / "m.onnx"), mode],
                             capture_output=True, text=True, timeout=300, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["shared"] is (mode == "shared")
        grew[mode] = result["grew_mib"]
    # one [4000, 4000] float is 61 MiB: six arenas keep more than four of them, the shared one about two
    assert grew["separate"] > 4 * 61, grew
    assert grew["shared"] < 0.5 * grew["separate"], grew


def _lookup_graph(table: np.ndarray, cast: bool = False, extra: bool = False, axis: int = 0) -> onnx.ModelProto:
    """``input_ids`` -> Gather(table) [-> Cast to float32] [-> Relu]: the embed graph's shape, and ones that are not
    a bare lookup."""
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["g"], axis=axis)]
    last = "g"
    if cast:
        nodes.append(helper.make_node("Cast", ["g"], ["c"], to=TensorProto.FLOAT))
        last = "c"
    if extra:
        nodes.append(helper.make_node("Relu", [last], ["r"]))
        last = "r"
    nodes[-1].output[0] = "inputs_embeds"
    out_type = TensorProto.FLOAT if cast or table.dtype == np.float32 else TensorProto.FLOAT16
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    graph = helper.make_graph(nodes, "embed", [ids],
                              [helper.make_tensor_value_info("inputs_embeds", out_type, ["b", "s", table.shape[1]])],
                              [numpy_helper.from_array(table, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("dtype, cast, external", [(np.float32, False, False), (np.float16, True, False),
                                                   (np.float32, False, True), (np.float16, True, True)])
def test_a_lookup_graph_is_its_table_and_gives_what_onnx_runtime_gives(tmp_path, dtype, cast, external):
    """gather_table reads the table (mapped from the external data file where the graph keeps it there) and
    ``table[ids].astype(dtype)`` equals ONNX Runtime's output for the graph, bit for bit."""
    import onnxruntime as ort

    from autoglm_build.onnx_io import gather_table

    table = np.random.default_rng(1).standard_normal((300, 24)).astype(dtype)
    path = tmp_path / "embed.onnx"
    save_model(_lookup_graph(table, cast=cast), path, large_bytes=0 if external else 1 << 30)
    assert (tmp_path / "embed.onnx.data").exists() == external
    found = gather_table(path)
    assert found is not None
    lookup, name, out = found
    assert name == "input_ids" and out == (np.float32 if cast else dtype)
    assert isinstance(lookup, np.memmap) == external
    ids = np.array([[0, 299, 5], [7, 7, 42]], np.int64)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    got = lookup[ids].astype(out)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("change", ["extra node", "axis 1"])
def test_a_graph_that_does_more_than_a_lookup_has_no_table(tmp_path, change):
    from autoglm_build.onnx_io import gather_table

    table = np.ones((30, 30), np.float32)
    path = tmp_path / "g.onnx"
    model = _lookup_graph(table, extra=change == "extra node", axis=1 if change == "axis 1" else 0)
    save_model(model, path, large_bytes=1 << 30)
    assert gather_table(path) is None
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    assert gather_table(tmp_path / "bad.onnx") is None


def test_a_lookup_whose_external_table_is_cut_short_has_no_table(tmp_path):
    from autoglm_build.onnx_io import gather_table

    path = tmp_path / "embed.onnx"
    save_model(_lookup_graph(np.ones((300, 24), np.float32)), path, large_bytes=0)
    data = tmp_path / "embed.onnx.data"
    assert gather_table(path) is not None
    data.write_bytes(data.read_bytes()[:-4])
    assert gather_table(path) is None
