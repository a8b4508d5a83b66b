"""A staged decoder (``decoder.stages: 2``, issue 15): two graphs whose chained outputs are the one
graph's, calibrated, verified and served as one module (ONNX Runtime, tiny config, trained weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from autoglm_build.cli import app
from autoglm_build.config import load_config
from autoglm_build.console import Reporter
from autoglm_build.errors import UserError
from autoglm_build.manifest import Manifest
from autoglm_build.modules import registry
from autoglm_build.parts import chain, layer_ranges, ort_part, split_name
from autoglm_build.pipeline import Pipeline
from autoglm_build.workdir import Build
from tests.conftest import write_config

MODULES = ["embed", "decoder"]


def _export(config: Path, workdir: Path, more_stages=()) -> Path:
    """``config``'s embed and decoder exported with the tiny config's trained checkpoint, then ``more_stages``."""
    from autoglm_build.stages.export import ExportStage

    cfg = load_config(config)
    quiet = Reporter(-1)
    Pipeline(cfg, workdir, [ExportStage(cfg.checkpoint)], MODULES, reporter=quiet, config_path=str(config)).run()
    if more_stages:
        Pipeline(cfg, workdir, list(more_stages), MODULES, reporter=quiet, config_path=str(config)).run()
    return workdir


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    """The tiny config with ``decoder.stages: 2``: every CPU stage for embed and the decoder's two stages."""
    from autoglm_build.stages.calibrate import CalibrateStage
    from autoglm_build.stages.optimize import OptimizeStage
    from autoglm_build.stages.samples import SamplesStage

    root = tmp_path_factory.mktemp("staged")
    config = write_config(root / "staged.yaml", {"modules": MODULES, "decoder": {"stages": 2}})
    stages = [OptimizeStage(), SamplesStage(), CalibrateStage("int8"), CalibrateStage("fp16")]
    return _export(config, root / "w", stages)


@pytest.fixture(scope="module")
def unstaged(tmp_path_factory) -> Path:
    """The same weights exported as one decoder graph."""
    root = tmp_path_factory.mktemp("unstaged")
    return _export(write_config(root / "one.yaml", {"modules": MODULES}), root / "w")


def test_layers_are_cut_into_contiguous_ranges():
    assert layer_ranges(40, 3) == [range(0, 14), range(14, 27), range(27, 40)]
    assert layer_ranges(2, 2) == [range(0, 1), range(1, 2)]
    assert split_name("decoder.stage1") == ("decoder", 1) and split_name("decoder") == ("decoder", None)


def test_a_staged_module_expands_into_its_stages_and_refuses_others(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", {"decoder": {"stages": 2}}))
    assert registry.expand(cfg, ["embed", "decoder"]) == ["embed", "decoder.stage0", "decoder.stage1"]
    assert registry.expand(cfg, ["decoder.stage1"]) == ["decoder.stage1"]
    assert registry.expand(cfg, ["decoder.stage1"], parts=False) == ["decoder"]
    with pytest.raises(UserError, match="decoder.stage2.*builds decoder.stage0, decoder.stage1"):
        registry.expand(cfg, ["decoder.stage2"])
    with pytest.raises(UserError, match="not built in stages"):
        registry.get("embed.stage0")
    one = load_config(write_config(tmp_path / "one.yaml", {}))
    assert registry.expand(one, ["decoder"]) == ["decoder"]


def test_more_stages_than_layers_is_a_config_error(tmp_path):
    result = CliRunner().invoke(app, ["run", "--dry-run", "-c", str(write_config(tmp_path / "c.yaml", {
        "decoder": {"stages": 3}})), "-w", str(tmp_path / "w")])
    assert result.exit_code == 2 and "decoder.stages: 3 exceeds text.num_hidden_layers 2" in result.output


def test_each_stage_is_its_own_graph_with_its_own_layers(staged):
    manifest = Manifest.load(staged)
    for stage in ("export", "optimize", "calibrate-int8", "calibrate-fp16"):
        assert manifest.record(stage, "decoder") is None
        assert [manifest.record(stage, f"decoder.stage{k}").status for k in (0, 1)] == ["done", "done"]
    assert manifest.record("samples", "decoder").status == "done"  # the module's samples, taken as one
    first, last = (ort_part(staged / "onnx" / f"decoder.stage{k}.onnx") for k in (0, 1))
    assert first[0] == ["inputs_embeds", "attention_mask", "position_ids", "past_key.0", "past_value.0"]
    assert last[0] == ["hidden_states_in", "attention_mask", "position_ids", "past_key.1", "past_value.1"]
    # each stage's precision graph answers to the decoder's gate at the logits, the stages before it quantized
    for k in (0, 1):
        accuracy = manifest.record("calibrate-int8", f"decoder.stage{k}").metrics["accuracy"]
        assert accuracy["output"] == "logits" and accuracy["greedy_agreement"] >= 0.95


def _step(rng, batch: int, seq: int, past: int, hidden: int = 128) -> dict:
    mask = np.ones((batch, past + seq), np.int64)
    mask[0, :2] = 0  # left padding
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, past:]
    return {"inputs_embeds": rng.standard_normal((batch, seq, hidden)).astype(np.float32), "attention_mask": mask,
            "position_ids": np.repeat(positions[:, None], 3, axis=1)}


@pytest.mark.parametrize("folder", ["onnx", "optimized"])
def test_chained_stages_equal_the_one_graph_in_prefill_and_decode(staged, unstaged, folder):
    one = ort_part(unstaged / "onnx" / "decoder.onnx")[1]
    two = chain([ort_part(staged / folder / f"decoder.stage{k}.onnx") for k in (0, 1)])
    rng = np.random.default_rng(0)
    batch, seq = 3, 9
    caches = {}
    for step in range(4):  # a prefill, then decode steps on each side's own cache
        past = 0 if step == 0 else seq + step - 1
        feed = _step(rng, batch, seq if step == 0 else 1, past)
        want_feed = {**feed, **(caches.get("one") or _empty(batch))}
        got_feed = {**feed, **(caches.get("two") or _empty(batch))}
        want, got = one(want_feed), two(got_feed)
        assert list(got) == list(want)  # logits first, then every present_*, as the one graph orders them
        for name, ref in want.items():
            np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-5, err_msg=f"step {step} {name}")
        caches = {side: {n.replace("present_", "past_"): v for n, v in out.items() if n.startswith("present_")}
                  for side, out in (("one", want), ("two", got))}


def _empty(batch: int) -> dict:
    return {f"past_{kind}.{i}": np.zeros((batch, 2, 0, 32), np.float32) for i in (0, 1) for kind in ("key", "value")}


def test_the_backend_runs_the_staged_decoder_as_one(staged, unstaged):
    from autoglm_build.runtime.backends import open_backend

    backends = [open_backend(w, MODULES, "onnxruntime") for w in (unstaged, staged)]
    assert set(backends[1].files) == {"embed", "decoder.stage0", "decoder.stage1"}
    feed = {**_step(np.random.default_rng(1), 2, 5, 0), **_empty(2)}
    want, got = (b.run("decoder", feed) for b in backends)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
    fp16 = open_backend(staged, MODULES, "onnxruntime", "fp16")
    assert {fp16.input_dtype("decoder", f"past_key.{i}") for i in (0, 1)} == {np.dtype(np.float16)}


def test_verify_strict_passes_on_the_staged_build(staged):
    result = CliRunner().invoke(app, ["verify", "-w", str(staged), "--strict", "--backend", "onnxruntime", "--json"])
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads(result.stdout)["rows"] if r["module"].startswith("decoder")]
    assert {(r["module"], r["precision"], r["batch"]) for r in rows} == {
        ("decoder", p, b) for p in ("int8", "fp16") for b in (1, 4, 8)}
    assert all(r["output"] == "logits" and r["passed"] for r in rows), rows
    assert Manifest.load(staged).record("verify", "decoder").status == "done"


def _chat(workdir: Path, prompt: str) -> dict:
    from fastapi.testclient import TestClient

    from autoglm_build.serve.app import create_app
    from autoglm_build.serve.server import build_state

    cfg = Manifest.load(workdir).config
    state = build_state(load_config_from(cfg), workdir, backend="onnxruntime")
    try:
        with TestClient(create_app(state)) as client:
            resp = client.post("/v1/chat/completions", json={
                "model": state.model_ids[0], "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 16, "temperature": 0})
    finally:
        state.backend.close()
    assert resp.status_code == 200, resp.text
    return resp.json()


def load_config_from(data: dict):
    from autoglm_build.config import BuildConfig

    return BuildConfig.model_validate(data)


@pytest.mark.parametrize("build", ["staged", "headed"])
def test_a_served_chat_on_the_staged_build_returns_the_unstaged_tokens(build, unstaged, request):
    """Two layer stages, or one layer stage and the head stage (``decoder.head_stage``)."""
    prompt = "Open WeChat and send hello to Alice"
    want, got = _chat(unstaged, prompt), _chat(request.getfixturevalue(build), prompt)
    assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
    assert got["usage"] == want["usage"] and got["usage"]["completion_tokens"] > 1


def _fake_engines(source: Path, tmp_path: Path, pair, precision: str):
    """(workdir, env, args): a copy of ``source`` with embed and the decoder's engines built by the fake
    TensorRT ``pair`` (TensorRT, Polygraphy); ``args`` name the copy and the precision for later commands."""
    import shutil

    from tests.engine.fake_trt import harness

    workdir = tmp_path / "w"
    shutil.copytree(source, workdir)
    env = harness.environment(*pair, tmp_path / "calls.jsonl")
    args = ["-w", str(workdir), "--precision", precision]
    built = harness.run(["-m", "autoglm_build", "engine", *args, "-m", "embed", "-m", "decoder"], env, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    return workdir, env, args


@pytest.mark.slow
def test_tensorrt_chains_the_staged_engines_symmetrically(staged, tmp_path):
    """Under the fake TensorRT 10.13 (tests/engine/fake_trt): `engine -m decoder` builds one engine per
    stage; verify's engine path, the backend's `run` and `device_call`, and a served chat chain them
    and equal ONNX Runtime on the same INT8 graphs; `bench` times the chained engines."""
    from tests.engine.fake_trt import harness

    workdir, env, args = _fake_engines(staged, tmp_path, ("10.13.0", "0.53.6"), "int8")
    manifest = Manifest.load(workdir)
    assert [manifest.record("engine-int8", f"decoder.stage{k}").status for k in (0, 1)] == ["done", "done"]
    verify = harness.run(["-m", "autoglm_build", "verify", *args, "-m", "decoder", "--backend", "tensorrt",
                          "--strict", "--json"], env, timeout=600)
    assert verify.returncode == 0, verify.stderr[-3000:]
    rows = json.loads(verify.stdout)["rows"]
    assert {(r["module"], r["output"]) for r in rows} == {("decoder", o) for o in ("logits", "present_key",
                                                                                     "present_value")}
    driven = harness.run([str(Path(harness.__file__).with_name("drive_staged.py")), str(workdir), "int8"], env)
    assert driven.returncode == 0, driven.stderr[-3000:]
    result = json.loads(driven.stdout.strip().splitlines()[-1])
    assert result["files"] == ["decoder.stage0", "decoder.stage1", "embed"]
    assert result["outputs"] == ["logits", "present_key.0", "present_value.0", "present_key.1", "present_value.1"]
    assert result["run_max_diff"] == 0.0 and result["device_max_diff"] == 0.0 and result["kept_max_diff"] == 0.0
    assert result["device_outputs"] == sorted(result["outputs"])
    assert result["chat"]["tensorrt"] == result["chat"]["onnxruntime"] and result["chat"]["tensorrt"]
    bench = harness.run(["-m", "autoglm_build", "bench", *args, "-m", "decoder", "--backends", "tensorrt",
                         "--min-time", "0.05", "--batches", "1", "--prompt", "16", "--past", "16", "--json"], env)
    assert bench.returncode == 0, bench.stderr[-3000:]
    report = json.loads(bench.stdout)
    assert not report["notes"] and {r["case"] for r in report["rows"] if r["backend"] == "tensorrt int8"} == {
        "prefill 16", "decode @16"}


SMALL, LARGE = (3 << 20) + 256, (5 << 20) + 256  # activation memory of no other buffer's size


def _scratch(workdir: Path, env: dict, stage0: int, stage1: int) -> dict:
    """``drive_scratch.py`` with the fake engines of stage 0 and 1 needing these many bytes of scratch."""
    from tests.engine.fake_trt import harness

    env = {**env, "FAKE_TRT_DEVICE_MEMORY": f"decoder.stage0={stage0},decoder.stage1={stage1}"}
    driven = harness.run([str(Path(harness.__file__).with_name("drive_scratch.py")), str(workdir), "fp16"], env,
                         timeout=600)
    assert driven.returncode == 0, driven.stderr[-3000:]
    return json.loads(driven.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("pair", [("8.5.3", "0.49.26"), ("10.13.0", "0.53.6")], ids=["trt8.5", "trt10.13"])
def test_the_decoder_stages_share_one_scratch_that_grows_as_they_load(staged, tmp_path, pair):
    """The layer stages' four contexts (two stages x prefill and decode) run on one activation buffer of the
    larger stage's size: allocated once when stage 0 needs the most; when stage 1 needs more, a bigger one
    replaces it while loading, stage 0's contexts follow it (the fake fails a run on freed memory) and the
    first is freed then. ``close`` frees the pool once (the fake fails a second ``cudaFree``), also after a
    load that failed midway; the chained runs, a staged ``device_call`` called twice without a sync and a
    served chat are unchanged."""
    workdir, env, _ = _fake_engines(staged, tmp_path, pair, "fp16")
    for stage0, stage1 in ((LARGE, SMALL), (SMALL, LARGE)):
        result = _scratch(workdir, env, stage0, stage1)
        assert result["violations"] == []
        assert result["scratch_bytes"] == {"decoder.stage0": stage0, "decoder.stage1": stage1}
        assert result["pools"] == [{"gpu": None, "bytes": LARGE, "parts": ["decoder.stage0", "decoder.stage1"]}]
        [pool] = result["pool_addresses"]
        assert list(result["contexts"]["embed"].values()) == [0]  # one profile: TensorRT's own memory
        assert [address for part in ("decoder.stage0", "decoder.stage1")
                for address in result["contexts"][part].values()] == [pool] * 4
        mallocs = [size for kind, _, size in result["loaded"] if kind == "malloc"]
        if stage0 == LARGE:
            assert mallocs == [LARGE] and result["loaded"] == [["malloc", pool, LARGE]]
        else:  # grown while stage 1 loaded: the first buffer freed, stage 0's contexts moved to the second
            first = result["loaded"][0][1]
            assert result["loaded"] == [["malloc", first, SMALL], ["malloc", pool, LARGE], ["free", first, SMALL]]
        assert result["closed"] == result["loaded"] + [["free", pool, LARGE]]
        failed = result["failed_load"]  # stage 1's decode runner refused: every scratch buffer freed once
        assert failed["error"] == "refused on purpose"
        assert failed["history"] == [[kind, size] for kind, _, size in result["closed"]]
        assert result["run_max_diff"] < 1e-2
        assert result["chat"]["tensorrt"] == result["chat"]["onnxruntime"] and result["chat"]["tensorrt"]


def test_three_stages_chain_to_the_one_graph(tmp_path):
    """A middle stage takes the activations in and gives them out (``decoder.stages: 3`` on a 3-layer
    decoder, random weights): its graph's input and output cannot share a name, and the chain still
    equals the one graph (prefill, then a decode step on each side's own cache)."""
    changes = {"modules": MODULES, "text": {"num_hidden_layers": 3}, "checkpoint": None}
    three = _export(write_config(tmp_path / "three.yaml", {**changes, "decoder": {"stages": 3}}), tmp_path / "w3")
    one = _export(write_config(tmp_path / "one.yaml", changes), tmp_path / "w1")
    parts = [ort_part(three / "onnx" / f"decoder.stage{k}.onnx") for k in range(3)]
    assert [len(p[0]) for p in parts] == [5, 5, 5]  # each stage: its input activations, mask, positions, own cache
    run_one, run_three = ort_part(one / "onnx" / "decoder.onnx")[1], chain(parts)
    empty = {f"past_{kind}.{i}": np.zeros((2, 2, 0, 32), np.float32) for i in range(3) for kind in ("key", "value")}
    rng = np.random.default_rng(3)
    want_feed = got_feed = {**_step(rng, 2, 6, 0), **empty}
    for step in range(2):
        want, got = run_one(want_feed), run_three(got_feed)
        assert list(got) == list(want)
        for name, ref in want.items():
            np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-5, err_msg=f"step {step} {name}")
        feed = _step(rng, 2, 1, 6)
        want_feed, got_feed = ({**feed, **{n.replace("present_", "past_"): v for n, v in out.items()
                                           if n.startswith("present_")}} for out in (want, got))


@pytest.fixture(scope="module")
def headed(tmp_path_factory) -> Path:
    """The tiny config with ``decoder.head_stage`` (one layer stage, then the head stage): export, optimize,
    samples and the FP16 precision graphs of embed and both parts, the trained checkpoint's weights."""
    from autoglm_build.stages.calibrate import CalibrateStage
    from autoglm_build.stages.optimize import OptimizeStage
    from autoglm_build.stages.samples import SamplesStage

    root = tmp_path_factory.mktemp("headed")
    config = write_config(root / "headed.yaml", {"modules": MODULES, "decoder": {"head_stage": True}})
    return _export(config, root / "w", [OptimizeStage(), SamplesStage(), CalibrateStage("fp16")])


def test_the_head_stage_is_a_graph_of_the_final_norm_and_lm_head_alone(headed, tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", {"decoder": {"stages": 2, "head_stage": True}}))
    assert registry.expand(cfg, ["decoder"]) == ["decoder.stage0", "decoder.stage1", "decoder.stage2"]
    layers, head = (ort_part(headed / "optimized" / f"decoder.stage{k}.onnx") for k in (0, 1))
    assert layers[0] == ["inputs_embeds", "attention_mask", "position_ids", "past_key.0", "past_value.0",
                         "past_key.1", "past_value.1"]
    assert head[0] == ["hidden_states_in"]
    import onnx

    graph = onnx.load(str(headed / "optimized" / "decoder.stage1.onnx")).graph
    assert [o.name for o in graph.output] == ["logits"]
    assert not any(n.op_type in ("Softmax", "Concat") for n in graph.node)  # no attention, no cache in the head
    weights = [t.name for t in graph.initializer]
    assert weights and not any("layers" in name for name in weights)


@pytest.mark.parametrize("folder", ["onnx", "optimized"])
def test_a_head_stage_chains_to_the_one_graph_in_prefill_and_decode(headed, unstaged, folder):
    one = ort_part(unstaged / "onnx" / "decoder.onnx")[1]
    two = chain([ort_part(headed / folder / f"decoder.stage{k}.onnx") for k in (0, 1)])
    rng = np.random.default_rng(4)
    caches = {}
    for step in range(3):
        past = 0 if step == 0 else 7 + step - 1
        feed = _step(rng, 2, 7 if step == 0 else 1, past)
        want = one({**feed, **(caches.get("one") or _empty(2))})
        got = two({**feed, **(caches.get("two") or _empty(2))})
        assert list(got) == list(want)
        for name, ref in want.items():
            np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-5, err_msg=f"step {step} {name}")
        caches = {side: {n.replace("present_", "past_"): v for n, v in out.items() if n.startswith("present_")}
                  for side, out in (("one", want), ("two", got))}


@pytest.mark.slow
def test_tensorrt_85_builds_and_chains_the_head_stage(headed, tmp_path):
    """Under the fake TensorRT 8.5.3: the head stage's engine has one profile and no mask or cache input;
    the backend's `run`, `device_call`, kept bindings and a served chat on the device cache chain it after
    the layer stage and equal ONNX Runtime on the same FP16 graphs."""
    from tests.engine.fake_trt import harness

    workdir, env, _ = _fake_engines(headed, tmp_path, ("8.5.3", "0.49.26"), "fp16")
    [found] = (workdir / "engines").glob("decoder.stage1*.json")
    sidecar = json.loads(found.read_text())
    assert [list(p) for p in sidecar["profiles"]] == [["hidden_states_in"]]
    driven = harness.run([str(Path(harness.__file__).with_name("drive_staged.py")), str(workdir), "fp16"], env)
    assert driven.returncode == 0, driven.stderr[-3000:]
    result = json.loads(driven.stdout.strip().splitlines()[-1])
    assert result["files"] == ["decoder.stage0", "decoder.stage1", "embed"]
    assert result["outputs"] == ["logits", "present_key.0", "present_value.0", "present_key.1", "present_value.1"]
    assert result["run_max_diff"] < 1e-2 and result["device_max_diff"] == 0.0 and result["kept_max_diff"] == 0.0
    assert result["chat"]["tensorrt"] == result["chat"]["onnxruntime"] and result["chat"]["tensorrt"]
    # the one-profile head stage shares the layer stage's activation scratch (one pool, both parts)
    assert [pool["parts"] for pool in result["scratch_pools"]] == [["decoder.stage0", "decoder.stage1"]]


def test_serve_loads_engine_alone_rate_chains_a_staged_decoder_on_onnx_runtime(headed):
    """``serve_load.py --engine-only --backend onnxruntime`` on a staged build (every full-size config is one
    now): the stages chained through the server's own host cache, not the one-graph IOBinding loop."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    config = next(headed.parent.glob("*.yaml"))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--engine-only", "-c",
                          str(config), "-w", str(headed), "--backend", "onnxruntime", "--max-tokens", "6"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert "stages chained" in result["what"] and "OrtKVCache" in result["what"]
    assert all(r["tokens_per_s"] > 0 and r["units"] == ["decoder.stage0", "decoder.stage1"]
               for r in result["rates"].values())


def test_turning_the_head_stage_on_changes_only_the_stages_it_changes(tmp_path):
    from autoglm_build.modules.decoder import DecoderStageSpec

    plain = load_config(write_config(tmp_path / "a.yaml", {"decoder": {"stages": 2}}))
    headed = load_config(write_config(tmp_path / "b.yaml", {"decoder": {"stages": 2, "head_stage": True}}))
    first, last = DecoderStageSpec(0), DecoderStageSpec(1)
    assert first.fingerprint_data(plain) == first.fingerprint_data(headed)  # stage 0 keeps its graph
    assert last.fingerprint_data(plain) != last.fingerprint_data(headed)  # stage 1 loses the norm and LM head


def test_fp16_stages_convert_alone_when_verify_measures_them(staged, tmp_path, monkeypatch):
    """``calibrate.measure_fp16: false`` (the 40-layer build's 8 stages convert in parallel): a stage's FP16 graph
    is made without calibration data or the stages before it, records no accuracy and says so; verify then
    measures the chained FP16 graphs against FP32 and passes."""
    import shutil

    from autoglm_build.stages import calibrate
    from autoglm_build.stages.base import StageContext
    from autoglm_build.stages.calibrate import CalibrateStage

    workdir = tmp_path / "w"
    shutil.copytree(staged, workdir)
    config = write_config(tmp_path / "c.yaml", {"modules": MODULES, "decoder": {"stages": 2},
                                                 "calibrate": {"measure_fp16": False}})
    cfg = load_config(config)

    def refuse(*args, **kwargs):
        raise AssertionError("read while measure_fp16 is false")

    with monkeypatch.context() as m:
        m.setattr(calibrate.CalibrationData, "discover", refuse)
        m.setattr(CalibrateStage, "earlier_graphs", refuse)
        outcomes = Pipeline(cfg, workdir, [CalibrateStage("fp16")], ["decoder.stage1", "decoder.stage0"],
                            reporter=Reporter(-1), config_path=str(config)).run()
    assert [(o.module, o.status) for o in outcomes] == [("decoder.stage1", "ran"), ("decoder.stage0", "ran")]
    for o in outcomes:
        assert o.record.metrics["accuracy"] is None and o.record.params["measured"] is False
        assert any("fp16 accuracy not measured" in w for w in o.record.warnings), o.record.warnings
        graph = onnx.load(str(Build(workdir).graph(o.module, "fp16")), load_external_data=False)
        kinds = {t.data_type for t in graph.graph.initializer}
        assert onnx.TensorProto.FLOAT16 in kinds
    result = CliRunner().invoke(app, ["verify", "-w", str(workdir), "-m", "decoder", "--precision", "fp16",
                                      "--backend", "onnxruntime", "--strict", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert rows and all(r["passed"] and r["cosine_min"] > 0.99 for r in rows), rows
    # settings an unmeasured FP16 graph never reads (data, gate, INT8's) leave it as it is; measuring does not
    other = load_config(write_config(tmp_path / "d.yaml", {
        "modules": MODULES, "decoder": {"stages": 2},
        "calibrate": {"measure_fp16": False, "data": str(tmp_path), "batches": 3, "method": "minmax"}}))
    measured = load_config(write_config(tmp_path / "e.yaml", {"modules": MODULES, "decoder": {"stages": 2}}))
    manifest = Manifest.load(workdir)
    prints = {name: CalibrateStage("fp16").fingerprint_data(StageContext(c, workdir, manifest), "decoder.stage1")
              for name, c in (("unmeasured", cfg), ("other settings", other), ("measured", measured))}
    assert prints["unmeasured"] == prints["other settings"] != prints["measured"]
