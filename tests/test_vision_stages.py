"""A staged vision tower (``vision.stages: 2`` and ``vision.head_stage``, issue 15): three graphs (a block each,
then the final norm, downsample and merger) whose chained ``image_embeds`` are the one graph's, each stage
calibrated inside the tower, verified, benchmarked and served as one module (ONNX Runtime, and the fake
TensorRT; tiny config, trained weights); two stages without the head stage chain to the same too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from autoglm_build.cli import app
from autoglm_build.config import load_config
from autoglm_build.console import Reporter
from autoglm_build.errors import UserError
from autoglm_build.imaging import VisionGeometry, pack, patchify
from autoglm_build.manifest import Manifest
from autoglm_build.modules import registry
from autoglm_build.parts import chain, ort_part
from autoglm_build.pipeline import Pipeline
from tests.conftest import ROOT, write_config

MODULES = ["vision", "embed", "decoder"]
#: the staged tower of these tests: two block stages and the head stage (vision.stage0 .. vision.stage2)
STAGED = {"stages": 2, "head_stage": True}
PARTS = ["vision.stage0", "vision.stage1", "vision.stage2"]
SCREEN = ROOT / "calibration_data" / "images" / "screen_chat.png"


def _build(config: Path, workdir: Path, vision_stages=()) -> Path:
    """Export and optimize every module of ``config`` (trained checkpoint), then ``vision_stages`` for the
    vision tower alone and FP16 graphs of embed and the decoder (the engines' inputs)."""
    from autoglm_build.stages.calibrate import CalibrateStage
    from autoglm_build.stages.export import ExportStage
    from autoglm_build.stages.optimize import OptimizeStage

    cfg = load_config(config)
    quiet = Reporter(-1)
    Pipeline(cfg, workdir, [ExportStage(cfg.checkpoint), OptimizeStage()], MODULES, reporter=quiet,
             config_path=str(config)).run()
    if vision_stages:
        Pipeline(cfg, workdir, list(vision_stages), ["vision"], reporter=quiet, config_path=str(config)).run()
        Pipeline(cfg, workdir, [CalibrateStage("fp16")], ["embed", "decoder"], reporter=quiet,
                 config_path=str(config)).run()
    return workdir


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    """The tiny config with two block stages and the head stage: vision's samples, INT8 and FP16 graphs per stage."""
    from autoglm_build.stages.calibrate import CalibrateStage
    from autoglm_build.stages.samples import SamplesStage

    root = tmp_path_factory.mktemp("vstaged")
    config = write_config(root / "staged.yaml", {"modules": MODULES, "vision": STAGED})
    return _build(config, root / "w", [SamplesStage(), CalibrateStage("int8"), CalibrateStage("fp16")])


@pytest.fixture(scope="module")
def unstaged(tmp_path_factory) -> Path:
    """The same weights, the tower as one graph."""
    root = tmp_path_factory.mktemp("vunstaged")
    return _build(write_config(root / "one.yaml", {"modules": MODULES}), root / "w")


def _pack(sizes, seed: int = 0) -> dict:
    cfg = load_config(ROOT / "configs" / "autoglm-phone-tiny.yaml")
    rng = np.random.default_rng(seed)
    geometry = VisionGeometry.of(cfg.vision)
    return pack([patchify(rng.standard_normal((3, h, w)).astype(np.float32), geometry) for h, w in sizes],
                cfg.vision.spatial_merge_size)


def test_the_tower_expands_into_its_stages_and_refuses_more_stages_than_layers(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", {"vision": {"stages": 2}}))
    assert registry.expand(cfg, ["vision", "decoder"]) == ["vision.stage0", "vision.stage1", "decoder"]
    assert registry.expand(cfg, ["vision.stage1"], parts=False) == ["vision"]
    with pytest.raises(UserError, match="vision.stage2.*builds vision.stage0, vision.stage1"):
        registry.expand(cfg, ["vision.stage2"])
    # how the tower is built is not what it computes: the unstaged tower keeps its fingerprint
    one = load_config(write_config(tmp_path / "one.yaml", {}))
    assert registry.get("vision").fingerprint_data(cfg) == registry.get("vision").fingerprint_data(one)
    assert registry.get("vision.stage0").fingerprint_data(cfg) != registry.get("vision.stage1").fingerprint_data(cfg)
    # the head stage: one more part; the last block stage then hands on hidden states (its own fingerprint)
    head = load_config(write_config(tmp_path / "head.yaml", {"vision": STAGED}))
    assert registry.expand(head, ["vision"]) == PARTS
    assert registry.get("vision").fingerprint_data(head) == registry.get("vision").fingerprint_data(one)
    assert registry.get("vision.stage0").fingerprint_data(head) == registry.get("vision.stage0").fingerprint_data(cfg)
    assert registry.get("vision.stage1").fingerprint_data(head) != registry.get("vision.stage1").fingerprint_data(cfg)
    assert registry.get("vision.stage2").blocks(head) == range(2, 2)
    result = CliRunner().invoke(app, ["run", "--dry-run", "-c", str(write_config(tmp_path / "b.yaml", {
        "vision": {"stages": 3}})), "-w", str(tmp_path / "w")])
    assert result.exit_code == 2 and "vision.stages: 3 exceeds vision.depth 2" in result.output


def test_each_stage_is_its_own_graph_measured_inside_the_tower(staged):
    manifest = Manifest.load(staged)
    for stage in ("export", "optimize", "calibrate-int8", "calibrate-fp16"):
        assert manifest.record(stage, "vision") is None
        assert [manifest.record(stage, part).status for part in PARTS] == ["done"] * 3
    assert manifest.record("samples", "vision").status == "done"  # the tower's samples, taken as one
    shown = CliRunner().invoke(app, ["inspect", "-w", str(staged), "--json"])
    assert shown.exit_code == 0, shown.output
    assert set(PARTS) <= {a["module"] for a in json.loads(shown.stdout)["artifacts"].values()}
    first, middle, head = (ort_part(staged / "optimized" / f"{part}.onnx") for part in PARTS)
    assert first[0] == ["pixel_values", "patch_pos", "patch_grid"]
    assert middle[0] == ["hidden_states_in", "patch_pos", "patch_grid"]
    assert head[0] == ["hidden_states_in"]  # the merge windows are consecutive patches: no bookkeeping
    # no checkpoint tensor reported unused: each stage's export ignores the other stages' weights
    for part in PARTS:
        assert not any("unused" in w for w in manifest.record("export", part).warnings)
        accuracy = manifest.record("calibrate-int8", part).metrics["accuracy"]
        assert accuracy["output"] == "image_embeds" and accuracy["cosine_min"] > 0.99, accuracy


@pytest.mark.parametrize("folder", ["onnx", "optimized"])
def test_chained_stages_equal_the_one_graph_on_a_pack_of_images(staged, unstaged, folder):
    one = ort_part(unstaged / folder / "vision.onnx")[1]
    two = chain([ort_part(staged / folder / f"{part}.onnx") for part in PARTS])
    for sizes in ([(112, 112)], [(644, 280), (168, 224), (224, 112)]):  # one image; three shapes in one pack
        feed = _pack(sizes, seed=len(sizes))
        want, got = one(feed), two(feed)
        assert list(got) == ["image_embeds"] and got["image_embeds"].shape == want["image_embeds"].shape
        np.testing.assert_allclose(got["image_embeds"], want["image_embeds"], rtol=1e-4, atol=1e-5)


def test_two_block_stages_without_the_head_stage_chain_to_the_one_graph(unstaged, tmp_path):
    """``vision.stages: 2`` alone: the second block stage ends in the merger (exported graphs)."""
    from autoglm_build.stages.export import ExportStage

    config = write_config(tmp_path / "two.yaml", {"modules": MODULES, "vision": {"stages": 2}})
    cfg = load_config(config)
    Pipeline(cfg, tmp_path / "w", [ExportStage(cfg.checkpoint)], ["vision"], reporter=Reporter(-1),
             config_path=str(config)).run()
    one = ort_part(unstaged / "onnx" / "vision.onnx")[1]
    two = chain([ort_part(tmp_path / "w" / "onnx" / f"vision.stage{k}.onnx") for k in (0, 1)])
    feed = _pack([(644, 280), (168, 224)], seed=3)
    np.testing.assert_allclose(two(feed)["image_embeds"], one(feed)["image_embeds"], rtol=1e-4, atol=1e-5)


def test_the_backend_encodes_with_the_stages_chained(staged, unstaged):
    from autoglm_build.runtime.backends import open_backend

    staged_backend, one_backend = (open_backend(w, ["vision"], "onnxruntime") for w in (staged, unstaged))
    assert set(staged_backend.files) == set(PARTS)
    feed = _pack([(280, 644), (112, 168)], seed=7)
    got, want = (b.encode("vision", feed, "image_embeds") for b in (staged_backend, one_backend))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_verify_strict_passes_on_the_staged_tower(staged):
    result = CliRunner().invoke(app, ["verify", "-w", str(staged), "-m", "vision", "--strict",
                                      "--backend", "onnxruntime", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert {(r["module"], r["precision"], r["batch"]) for r in rows} == {
        ("vision", p, b) for p in ("int8", "fp16") for b in (1, 4, 8)}
    assert all(r["output"] == "image_embeds" and r["passed"] for r in rows), rows


def _image_chat(workdir: Path) -> dict:
    from tests.engine.fake_trt.drive_vision_staged import chat

    out = chat(workdir, "onnxruntime", None, SCREEN, max_tokens=16)
    assert out["status"] == 200, out
    return out


def test_a_served_image_chat_on_the_staged_tower_returns_the_unstaged_reply(staged, unstaged):
    want, got = _image_chat(unstaged), _image_chat(staged)
    assert set(PARTS) <= set(got["files"]) and "vision" in want["files"]
    assert got["image_tokens"] == 230  # 1080x2400 at the tiny max_pixels
    assert got["usage"] == want["usage"] and got["usage"]["completion_tokens"] > 1
    assert got["content"] == want["content"]


def test_fp16_stages_convert_alone_when_verify_measures_them(staged, tmp_path):
    """``calibrate.measure_fp16: false``: each vision stage's FP16 graph is made without the stages before it,
    records no accuracy, and verify measures the chained FP16 graphs against FP32."""
    from autoglm_build.stages.calibrate import CalibrateStage

    workdir = tmp_path / "w"
    shutil.copytree(staged, workdir)
    config = write_config(tmp_path / "c.yaml", {"modules": MODULES, "vision": STAGED,
                                                 "calibrate": {"measure_fp16": False}})
    outcomes = Pipeline(load_config(config), workdir, [CalibrateStage("fp16")], PARTS[::-1],
                        reporter=Reporter(-1), config_path=str(config)).run()
    assert [(o.module, o.status) for o in outcomes] == [(part, "ran") for part in PARTS[::-1]]
    assert all(o.record.metrics["accuracy"] is None for o in outcomes)
    result = CliRunner().invoke(app, ["verify", "-w", str(workdir), "-m", "vision", "--precision", "fp16",
                                      "--backend", "onnxruntime", "--strict", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert rows and all(r["passed"] and r["cosine_min"] > 0.99 for r in rows), rows


@pytest.mark.slow
def test_tensorrt_builds_and_chains_the_staged_tower(staged, tmp_path):
    """Under the fake TensorRT 8.5.3 (tests/engine/fake_trt): `engine -m vision` builds one engine per stage;
    verify's engine path, the backend's `run`, `encode` (the embeddings left on the GPU) and `device_call`,
    and a served chat with a screenshot chain them and equal ONNX Runtime on the same FP16 graphs."""
    from tests.engine.fake_trt import harness

    workdir = tmp_path / "w"
    shutil.copytree(staged, workdir)
    env = harness.environment("8.5.3", "0.49.26", tmp_path / "calls.jsonl")
    args = ["-w", str(workdir), "--precision", "fp16"]
    built = harness.run(["-m", "autoglm_build", "engine", *args, "-m", "vision", "-m", "embed", "-m", "decoder"],
                        env, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    manifest = Manifest.load(workdir)
    assert [manifest.record("engine-fp16", part).status for part in PARTS] == ["done"] * 3
    assert manifest.record("engine-fp16", "vision") is None
    verify = harness.run(["-m", "autoglm_build", "verify", *args, "-m", "vision", "--backend", "tensorrt",
                          "--strict", "--json"], env, timeout=600)
    assert verify.returncode == 0, verify.stderr[-3000:]
    rows = [r for r in json.loads(verify.stdout)["rows"] if r["backend"] == "tensorrt"]
    assert rows and {(r["module"], r["output"]) for r in rows} == {("vision", "image_embeds")}
    driven = harness.run([str(Path(harness.__file__).with_name("drive_vision_staged.py")), str(workdir), "fp16",
                          str(SCREEN)], env, timeout=600)
    assert driven.returncode == 0, driven.stderr[-3000:]
    result = json.loads(driven.stdout.strip().splitlines()[-1])
    assert result["files"] == ["decoder", "embed", *PARTS]
    assert result["outputs"] == ["image_embeds"] and result["images"] > 1
    assert result["run_max_diff"] < 1e-2 and result["encode_max_diff"] == 0.0 and result["device_max_diff"] == 0.0
    assert result["encoded"] == "DeviceEmbeds" and result["device_outputs"] == ["image_embeds"]
    # encode chains the stages on the GPU: no copy back to the host, uploads no bigger than the feed (the
    # second stage's inputs besides hidden_states come from the feed too), hidden_states handed over in place
    traffic = result["encode_traffic"]
    assert traffic["d2h_calls"] == 0 and traffic["d2d_calls"] == 0, traffic
    assert 0 < traffic["h2d_bytes"] <= 2 * result["feed_bytes"], (traffic, result["feed_bytes"])
    # the stages share one activation scratch (one profile each): one pool of the larger need, both pointed at it
    pools = {pool["parts"][0].split(".")[0]: pool for pool in result["scratch_pools"]}
    assert pools["vision"]["parts"] == PARTS, result["scratch_pools"]
    assert pools["vision"]["bytes"] == max(result["scratch_bytes"][p] for p in PARTS)
    address = result["pool_addresses"]["vision@None"]
    assert result["given_memory"] == {part: [address] for part in PARTS}
    chats = result["chat"]
    assert chats["tensorrt"]["status"] == chats["onnxruntime"]["status"] == 200
    assert set(PARTS) <= set(chats["tensorrt"]["files"])
    assert chats["tensorrt"]["image_tokens"] == chats["onnxruntime"]["image_tokens"] == 230
    assert chats["tensorrt"]["content"] == chats["onnxruntime"]["content"] and chats["tensorrt"]["content"]
    bench = harness.run(["-m", "autoglm_build", "bench", *args, "-m", "vision", "--backends", "tensorrt,onnxruntime",
                         "--min-time", "0.05", "--batches", "1", "--json"], env, timeout=600)
    assert bench.returncode == 0, bench.stderr[-3000:]
    report = json.loads(bench.stdout)
    assert not report["notes"], report["notes"]
    assert {r["backend"] for r in report["rows"]} >= {"tensorrt fp16", "onnxruntime fp32"}


def test_a_stage_calibrates_on_its_modules_preprocessed_npz_batches(tmp_path):
    """``<data>/vision/*.npz`` (the tower's inputs, preprocessed) reach every stage of a staged tower: each
    stage's calibration starts from its module's batches; it used to look under ``<data>/vision.stage1/``."""
    from autoglm_build.calibration import CalibrationData
    from autoglm_build.modules.base import npz_feeds

    cfg = load_config(write_config(tmp_path / "c.yaml", {"vision": {"stages": 2}}))
    data = tmp_path / "data"
    (data / "vision").mkdir(parents=True)
    feed = _pack([(112, 112)])
    np.savez(data / "vision" / "extra.npz", **feed)
    found = CalibrationData.discover(data)
    for part in ("vision", "vision.stage0", "vision.stage1"):
        [got] = npz_feeds(registry.get(part), cfg, found)
        assert sorted(got) == sorted(feed) and all(np.array_equal(got[k], feed[k]) for k in feed), part
