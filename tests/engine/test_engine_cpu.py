"""The engine path where there is no TensorRT (CI): profiles, sidecar checks, exit codes, ORT verify."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from autoglm_build.cli import app
from autoglm_build.engine import tensorrt as trt_env
from autoglm_build.engine.profiles import profiles
from autoglm_build.engine.sidecar import EngineMismatch, Sidecar, check_loadable
from autoglm_build.manifest import sha256_file
from tests.conftest import TINY

pytestmark = pytest.mark.skipif(trt_env.available(), reason="checks the behaviour without TensorRT")


def test_profiles_keep_cache_axes_consistent(tiny_build, tiny_cfg):
    (vision,) = profiles(tiny_cfg, tiny_build / "onnx" / "vision.onnx", 8, 4)
    # packed patches: from one merge window to one image at vision.max_pixels, tuned for one screenshot
    assert vision["pixel_values"] == ((4, 1176), (920, 1176), (1024, 1176))
    assert vision["patch_pos"] == ((4, 2), (920, 2), (1024, 2))
    assert vision["patch_grid"] == ((4, 3), (920, 3), (1024, 3))
    prefill, decode = profiles(tiny_cfg, tiny_build / "onnx" / "decoder.onnx", 8, 4)
    context = tiny_cfg.engine.context
    for profile in (prefill, decode):
        for k in range(3):  # min, opt, max: total_seq = past_seq + seq
            seq = profile["inputs_embeds"][k][1]
            past = profile["past_key.0"][k][2]
            assert profile["attention_mask"][k][1] == past + seq
    chunk = tiny_cfg.engine.prefill_tokens  # a long prompt's later chunks prefill after the earlier ones' cache
    assert prefill["inputs_embeds"][2][1] == chunk and prefill["past_key.0"][2][2] == context - 1
    assert decode["inputs_embeds"][2][1] == 1
    assert decode["attention_mask"][2][1] == context  # the KV cache is bounded by the context
    assert prefill["inputs_embeds"][2][0] == decode["inputs_embeds"][2][0] == 8  # prefill_batch: max_batch


def test_prefill_batch_bounds_the_prefill_profile_only(tiny_build, tiny_cfg):
    """engine.prefill_batch: the prefill profile's rows (a long context's attention scores grow with them);
    the decode profile and the graphs without a cache keep the max batch; above max_batch it is refused."""
    cfg = tiny_cfg.model_copy(update={"engine": tiny_cfg.engine.model_copy(update={"prefill_batch": 1})})
    prefill, decode = profiles(cfg, tiny_build / "onnx" / "decoder.onnx", 8, 4)
    assert [prefill["inputs_embeds"][k][0] for k in range(3)] == [1, 1, 1]
    assert [prefill["past_key.0"][k][0] for k in range(3)] == [1, 1, 1]
    assert [decode["inputs_embeds"][k][0] for k in range(3)] == [1, 4, 8]
    (embed,) = profiles(cfg, tiny_build / "onnx" / "embed.onnx", 8, 4)
    assert embed["input_ids"][2][0] == 8


def test_engine_without_tensorrt_exits_4_with_one_line(tiny_build_copy):
    result = CliRunner().invoke(app, ["engine", "-c", str(TINY), "-w", str(tiny_build_copy)])
    assert result.exit_code == 4
    assert result.stderr.splitlines()[0].startswith("error: TensorRT is not installed here")


def test_verify_without_tensorrt_checks_onnx_and_says_engines_were_skipped(tmp_path):
    workdir = tmp_path / "w"
    args = ["-c", str(TINY), "-w", str(workdir)]
    assert CliRunner().invoke(app, ["run", *args, "-q"]).exit_code == 0
    result = CliRunner().invoke(app, ["verify", *args, "--json", "--strict"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and not report["engines_checked"]
    assert "TensorRT engine checks skipped" in report["notes"][0] and "skipped" in result.stderr
    assert {(r["module"], r["precision"]) for r in report["rows"]} == {
        (m, p) for m in ("vision", "audio", "embed", "decoder") for p in ("fp16", "int8")}
    assert {r["batch"] for r in report["rows"]} == {1, 4, 8}


def _fake_engine(tmp_path, **changes):
    engine = tmp_path / "vision.fp16.engine"
    engine.write_bytes(b"not really an engine")
    fields = dict(module="vision", precision="fp16", tensorrt_version="8.5.3.1", strongly_typed=False,
                  gpu_name="NVIDIA H100", compute_capability="9.0", profiles=[], profile_names=["default"],
                  source_onnx="fp16/vision.onnx", source_onnx_sha256="0" * 64, build_seconds=1.0, engine_bytes=20,
                  engine_sha256=sha256_file(engine))
    fields.update(changes)
    Sidecar(**fields).write(engine)
    return engine


@pytest.mark.parametrize("version, cc, manifest_sha, message", [
    ("8.6.1", "9.0", None, "built by TensorRT 8.5.3.1, this is TensorRT 8.6.1"),
    ("8.5.3.1", "8.0", None, "built for compute capability 9.0 (NVIDIA H100), this GPU is 8.0"),
    ("8.5.3.1", "9.0", "f" * 64, "does not match the manifest"),
])
def test_engine_checks_before_loading(tmp_path, version, cc, manifest_sha, message):
    engine = _fake_engine(tmp_path)
    with pytest.raises(EngineMismatch, match=re.escape(message)):
        check_loadable(engine, manifest_sha, version, cc)
    assert check_loadable(engine, sha256_file(engine), "8.5.3.1", "9.0").module == "vision"


def test_modified_engine_or_missing_sidecar(tmp_path):
    engine = _fake_engine(tmp_path)
    engine.write_bytes(b"not really an engine, edited")
    with pytest.raises(EngineMismatch, match="modified or truncated"):
        check_loadable(engine, None, "8.5.3.1", "9.0")
    Sidecar.path_for(engine).unlink()
    with pytest.raises(EngineMismatch, match="engine sidecar missing"):
        check_loadable(engine, None, "8.5.3.1", "9.0")


def test_preview_features_default_to_faster_dynamic_shapes_on_tensorrt_8_5_only():
    import enum
    from types import SimpleNamespace

    from autoglm_build.errors import UserError
    from autoglm_build.stages.engine import preview_features

    names = ["FASTER_DYNAMIC_SHAPES_0805", "DISABLE_EXTERNAL_TACTIC_SOURCES_FOR_CORE_0805"]
    Feature = enum.Enum("PreviewFeature", names)
    trt85 = SimpleNamespace(__version__="8.5.3.1", PreviewFeature=Feature)
    trt10 = SimpleNamespace(__version__="10.3.0", PreviewFeature=Feature)
    assert preview_features(trt85, None) == [Feature.FASTER_DYNAMIC_SHAPES_0805]
    assert preview_features(trt10, None) == []
    assert preview_features(trt85, []) == []
    names = ["DISABLE_EXTERNAL_TACTIC_SOURCES_FOR_CORE_0805"]
    assert preview_features(trt10, names) == [Feature.DISABLE_EXTERNAL_TACTIC_SOURCES_FOR_CORE_0805]
    with pytest.raises(UserError, match=r"engine.preview_features: NOPE not in TensorRT 10.3.0's PreviewFeature"):
        preview_features(trt10, ["NOPE"])


@pytest.mark.parametrize("norm", ["LayerNormalization", "RMS"])
def test_older_tensorrt_parses_a_copy_only_where_a_layernorm_needs_decomposing(tmp_path, norm):
    """Below TensorRT 8.6 the parser needs LayerNormalization decomposed: a temp copy of the graph with it
    rewritten; a graph without one (the decoder's RMSNorm) is parsed as it is, no copy made."""
    import onnx
    from onnx import TensorProto, helper

    from autoglm_build.stages.engine import for_this_tensorrt

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    inits = [helper.make_tensor("g", TensorProto.FLOAT, [8], [1.0] * 8),
             helper.make_tensor("b", TensorProto.FLOAT, [8], [0.0] * 8)]
    if norm == "LayerNormalization":
        nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)]
    else:  # x * rsqrt(mean(x^2) + eps) * g, as the decoder's RMSNorm exports
        nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]),
                 helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
                 helper.make_node("Sqrt", ["ms"], ["rms"]),
                 helper.make_node("Div", ["x", "rms"], ["n"]),
                 helper.make_node("Mul", ["n", "g"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    source = tmp_path / "m.onnx"
    onnx.save(model, str(source))

    class Old:
        __version__ = "8.5.3.1"

    with for_this_tensorrt(Old(), source, tmp_path) as (parsed, adapted):
        ops = [n.op_type for n in onnx.load(str(parsed)).graph.node]
        copies = [p for p in tmp_path.iterdir() if p.name.startswith(".trt-parse-")]
        if norm == "LayerNormalization":
            assert parsed != source and copies and adapted == {"decompose-layernorm": 1}
            assert "LayerNormalization" not in ops and "ReduceMean" in ops
        else:
            assert parsed == source and not copies and adapted == {"decompose-layernorm": 0}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".trt-parse-")]
