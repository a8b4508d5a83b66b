"""The decoder's stages placed on GPUs (issue 15, ``serve --devices 0,1``) under the fake TensorRT, whose CUDA
runtime simulates two devices: the current device per thread, each allocation, stream, event and engine
owned by the device current when it was made, and checks that fail when an engine call, a copy or a stream
order crosses devices the wrong way (tests/engine/fake_trt/pkg/fake_cuda.py).

Greedy served generations (``tests.runtime.device_scenario``: prompts alone, two rows at a time joining and
leaving, phone-agent steps with screenshots and prefix-cache hits) on the staged tiny decoder (2 stages)
placed on fake GPUs [0, 1] equal those on [0] and unplaced, on the device cache and on the host cache; the
fake runtime saw stage 1's engine and memory on device 1 only, everything else on device 0, activations
crossing by peer copy, and no violation. Each way of getting the placement wrong that the checks exist for
is shown to fail them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict

import pytest
from typer.testing import CliRunner

from autoglm_build.cli import app
from autoglm_build.errors import UserError
from autoglm_build.runtime.device import check_placement, parse_devices, stage_devices
from tests.conftest import write_config
from tests.engine.fake_trt import harness

PAIR = ("10.13.0", "0.53.6")
MODULES = ["-m", "vision", "-m", "embed", "-m", "decoder"]
DRIVER = str(Path(__file__).with_name("drive_devices.py"))


def test_stage_i_of_n_goes_to_devices_i_times_len_over_n():
    assert stage_devices([0, 1], 2) == [0, 1]
    assert stage_devices([0, 1], 4) == [0, 0, 1, 1]
    assert stage_devices([0, 1], 3) == [0, 0, 1]
    assert stage_devices([3, 1], 3) == [3, 3, 1]  # the listed order, not the indices' order
    assert stage_devices([2], 2) == [2, 2]
    assert stage_devices([0, 1, 2], 3) == [0, 1, 2]
    assert stage_devices([0, 1], 2, head=True) == [0, 1, 1]  # the head stage beside the last layer stage


def test_a_bad_device_list_is_one_line_naming_the_option():
    assert parse_devices("0,1") == [0, 1] and parse_devices(" 1 , 0 ") == [1, 0]
    for text, match in (("0,0", "GPU 0 listed twice"), ("a,1", "not a comma-separated list"),
                        ("-1", "not a comma-separated list"), ("", "not a comma-separated list")):
        with pytest.raises(UserError, match=match):
            parse_devices(text)
    with pytest.raises(UserError, match=r"--devices 0,1,2: 3 GPUs for a decoder of 2 stages") as info:
        check_placement([0, 1, 2], 2)
    assert "decoder.stages: 3" in info.value.hint
    with pytest.raises(UserError, match=r"serve.devices 0,1: 2 GPUs for a decoder built as one stage"):
        check_placement([0, 1], 1, "serve.devices")
    check_placement([1], 1)
    check_placement([0, 1], 4)


def test_the_config_field_is_checked_at_load(tmp_path):
    from autoglm_build.config import load_config

    assert load_config(write_config(tmp_path / "a.yaml", {"serve": {"devices": [1, 0]}})).serve.devices == [1, 0]
    assert load_config(write_config(tmp_path / "b.yaml", {})).serve.devices is None
    for devices, match in (([0, 0], "serve.devices: GPU 0 listed twice"), ([-1], "serve.devices: GPU indices are 0"),
                           ([], "serve.devices: List should have at least 1 item")):
        with pytest.raises(UserError, match=match):
            load_config(write_config(tmp_path / "c.yaml", {"serve": {"devices": devices}}))


def test_serve_devices_is_parsed_before_anything_loads(tmp_path):
    result = CliRunner().invoke(app, ["serve", "-w", str(tmp_path / "nothing"), "--devices", "0,x"])
    assert result.exit_code == 2 and "--devices '0,x': not a comma-separated list of GPU indices" in result.output


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> Path:
    """The tiny config with ``decoder.stages: 2``: vision, embed and the decoder's two stages, every CPU stage."""
    root = tmp_path_factory.mktemp("devices")
    config = write_config(root / "staged.yaml", {"decoder": {"stages": 2}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
    out = harness.run(["-m", "autoglm_build", "run", "-c", str(config), "-w", str(root / "w"), *MODULES, "-q"], env,
                      timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "w"


@pytest.fixture(scope="module")
def engines(graphs, tmp_path_factory):
    """The build's fp16 engines under the fake TensorRT, and the environment of two fake GPUs."""
    root = tmp_path_factory.mktemp("engines")
    workdir = root / "w"
    shutil.copytree(graphs, workdir)
    env = harness.environment(*PAIR, root / "calls.jsonl")
    env["FAKE_CUDA_DEVICES"] = "2"
    built = harness.run(["-m", "autoglm_build", "engine", "-w", str(workdir), *MODULES, "--precision", "fp16"], env,
                        timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    return workdir, env


def _drive(engines, devices: str, mode: str = "device") -> Dict[str, Any]:
    workdir, env = engines
    out = harness.run([DRIVER, str(workdir), "fp16", devices, mode], env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


TOKENS = ("solo", "joining", "agent_alone", "agent")


@pytest.mark.slow
def test_the_staged_decoder_on_two_gpus_generates_what_it_does_on_one(engines):
    """Acceptance (issue 15, on the fake runtime): the same greedy tokens on [0, 1] as on [0] and unplaced
    (and as ONNX Runtime on the same graphs), each stage's engine and memory on its own device."""
    unplaced, one, two = _drive(engines, "none", "ort"), _drive(engines, "0"), _drive(engines, "0,1")
    for run in (unplaced, one, two):
        assert run["error"] is None and run["fake"]["violations"] == [], run["fake"]["violations"][:3]
        assert run["tensorrt"]["cache"] == "DeviceKVCache"
    for case in TOKENS:
        assert two["tensorrt"][case] == one["tensorrt"][case] == unplaced["tensorrt"][case], case
        assert unplaced["tensorrt"][case] == unplaced["onnxruntime"][case], case
    assert two["long_twice"] == one["long_twice"] and two["long_twice"][0] == two["long_twice"][1]
    assert two["tensorrt"]["prefix"]["hits"] == 2  # prefix blocks saved and reused on both GPUs
    assert two["tensorrt"]["screens_on_device"] == ["DeviceEmbeds", "DeviceEmbeds"]
    fake = two["fake"]
    assert fake["engines"] == {"vision": [0], "embed": [0], "decoder.stage0": [0], "decoder.stage1": [1]}
    assert two["tensorrt"]["describe"]["placement"] == {"vision": 0, "embed": 0, "decoder.stage0": 0,
                                                        "decoder.stage1": 1}
    # the decoder's stages share one activation scratch per GPU: one pool on each of two, both stages' on one
    assert two["tensorrt"]["describe"]["scratch_pools"] == [{"gpu": 0, "bytes": 1 << 20, "parts": ["decoder.stage0"]},
                                                            {"gpu": 1, "bytes": 1 << 20, "parts": ["decoder.stage1"]}]
    assert one["tensorrt"]["describe"]["scratch_pools"] == [{"gpu": 0, "bytes": 1 << 20,
                                                             "parts": ["decoder.stage0", "decoder.stage1"]}]
    # device 1 holds stage 1's half of the KV store (2 slots x 1 layer x key/value x 2 heads x context x 32 FP16)
    assert int(fake["allocated"]["1"]) >= 2 * 2 * 2 * (16384 - 1) * 32 * 2
    assert fake["peer"][0] > 0 and fake["peer_access"] == ["0->1", "1->0"]
    for run in (unplaced, one):
        assert set(run["fake"]["allocated"]) == {"0"} and run["fake"]["peer"] == [0, 0]
        assert set(d for ds in run["fake"]["engines"].values() for d in ds) == {0}
    steps = [s for case in two["tensorrt"]["steps"].values() for s in case]
    for step in steps:  # the cache's own count covers both GPUs: it is the runtime's
        assert step["device"]["h2d_bytes"] == step["fake"]["h2d"] and step["device"]["d2h_bytes"] == step["fake"]["d2h"]
        assert step["fake"]["d2h"] <= step["logits_bytes"]  # the logits come back from the last GPU alone


@pytest.mark.slow
def test_the_host_cache_honours_the_placement(engines):
    """The host KV cache (Polygraphy's ``infer``) runs each stage on its GPU, activations through the host."""
    one, two = _drive(engines, "0", "host"), _drive(engines, "0,1", "host")
    for run in (one, two):
        assert run["error"] is None and run["fake"]["violations"] == []
        assert run["tensorrt"]["cache"] == "KVCache"
    for case in TOKENS:
        assert two["tensorrt"][case] == one["tensorrt"][case], case
    assert two["fake"]["engines"]["decoder.stage1"] == [1] and two["fake"]["engines"]["decoder.stage0"] == [0]


@pytest.mark.slow
@pytest.mark.parametrize("mode, expected", [
    ("d2d", "cudaMemcpyDeviceToDevice from device 0 memory to device 1 memory"),
    ("no-wait", "written on stream"),
    ("no-back-wait", "engine decoder.stage0 on stream"),
    ("one-gpu-cache", "engine decoder.stage1 of device 1 on a stream of device 0"),
])
def test_the_fake_runtime_catches_each_placement_mistake(engines, mode, expected):
    run = _drive(engines, "0,1", mode)
    assert any(expected in v for v in run["fake"]["violations"]), run["fake"]["violations"][:5]


@pytest.mark.slow
def test_serve_refuses_a_placement_the_machine_or_build_cannot_take(engines, graphs):
    """One line each, exit 2: a GPU that does not exist, more GPUs than stages, a placement on ONNX Runtime."""
    workdir, env = engines
    cases = [(["--devices", "0,5"], "--devices 0,5: GPU 5 does not exist here (2 visible: 0, 1)"),
             (["--devices", "0,1,2"], "--devices 0,1,2: 3 GPUs for a decoder of 2 stages"),
             (["--devices", "0,1", "--backend", "onnxruntime"], "--devices 0,1: places TensorRT engines on GPUs")]
    for args, message in cases:
        out = harness.run(["-m", "autoglm_build", "serve", "-w", str(workdir), "--port", "0", *args], env)
        assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr


def test_serve_takes_the_config_field_when_the_flag_is_absent(graphs):
    from autoglm_build.config import BuildConfig
    from autoglm_build.manifest import Manifest
    from autoglm_build.serve.server import build_state

    cfg = BuildConfig.model_validate(Manifest.load(graphs).config)
    placed = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"devices": [0, 1]})})
    with pytest.raises(UserError, match=r"^serve.devices 0,1: places TensorRT engines on GPUs"):
        build_state(placed, graphs, backend="onnxruntime")
    with pytest.raises(UserError, match=r"^--devices 1: places TensorRT engines"):
        build_state(placed, graphs, backend="onnxruntime", devices=[1])
