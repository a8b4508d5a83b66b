"""On a machine with TensorRT and a GPU (the device harness): the bound call `bench` times computes
what Polygraphy's `infer` computes, for each profile of the tiny engines; the device-resident KV cache
serves what the host cache serves and keeps the cache on the GPU.

Needs a workdir whose fp16 engines were built there: ``AUTOGLM_BUILD_TRT_WORKDIR`` (the device cache's
test: vision, embed and decoder engines, and the vision samples). The two-GPU test (issue 15) needs a
staged decoder's engines there (``decoder.stages: 2``: embed, decoder.stage0, decoder.stage1; vision
optional) and two visible GPUs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from autoglm_build.bench import cases
from autoglm_build.config import load_config
from autoglm_build.engine import tensorrt as trt_env
from autoglm_build.manifest import Manifest
from autoglm_build.parts import module_parts
from autoglm_build.runtime.backends import Backend, TensorRTBackend, open_backend
from tests.conftest import TINY

pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(not trt_env.available(), reason="needs TensorRT and a GPU (run scripts/device_full.sh)"),
    pytest.mark.skipif(not os.environ.get("AUTOGLM_BUILD_TRT_WORKDIR"), reason="AUTOGLM_BUILD_TRT_WORKDIR not set"),
]


@pytest.mark.parametrize("module", ["vision", "decoder"])
def test_device_call_matches_infer(module):
    workdir = Path(os.environ["AUTOGLM_BUILD_TRT_WORKDIR"])
    cfg = load_config(TINY)
    backend = TensorRTBackend(workdir, Manifest.load(workdir), [module], "fp16")
    try:
        for case in cases(cfg, module, [1, 3], prompt=9, past=5):
            expected = backend.run(module, case["feed"], case["phase"])
            call, sync, outputs = backend.device_call(module, case["feed"], case["phase"])
            for _ in range(2):  # a second call on the same buffers gives the same answer
                call()
            sync()
            assert sorted(outputs) == sorted(expected)
            for name, array in outputs.items():
                got = array.numpy().astype(np.float32)
                assert got.shape == expected[name].shape, (case["case"], name)
                np.testing.assert_allclose(got, expected[name], rtol=0, atol=1e-6, err_msg=f"{case['case']} {name}")
    finally:
        backend.close()


def test_the_device_cache_serves_what_the_host_cache_serves_and_keeps_the_cache_on_the_gpu(monkeypatch):
    """Issue 14 on a real GPU: served greedy generations (tests.runtime.device_scenario: alone, batched,
    rows joining and leaving, phone-agent steps hitting the prefix cache with the vision engine's
    embeddings left on the GPU) on the device cache equal those of the host cache through Polygraphy's
    ``infer`` (the same engines and shapes), batched equal solo, reuse equal a whole prefill; per decode
    step the cache's own count of copies shows only the ids, positions, mask elements and the rows'
    logits crossing, and contexts bound once per (rows, capacity)."""
    from tests.runtime.device_scenario import scenario
    from tests.runtime.test_device_cache import traffic_problems

    workdir = Path(os.environ["AUTOGLM_BUILD_TRT_WORKDIR"])
    on_device = scenario(workdir, "tensorrt", "fp16")
    monkeypatch.setattr(TensorRTBackend, "kv_cache", Backend.kv_cache)
    on_host = scenario(workdir, "tensorrt", "fp16")
    assert on_device["cache"] == "DeviceKVCache" and on_host["cache"] == "KVCache"
    assert on_device["screens_on_device"] == ["DeviceEmbeds", "DeviceEmbeds"]
    for case in ("solo", "batched", "joining", "agent_alone", "agent"):
        assert on_device[case] == on_host[case], case
    assert on_device["batched"] == on_device["joining"] == on_device["solo"]
    assert on_device["agent"] == on_device["agent_alone"] and on_device["prefix"]["hits"] == 2
    steps = [s for case in on_device["steps"].values() for s in case]
    assert steps and traffic_problems(steps, counted="device") == []
    for case in on_device["steps"].values():
        for before, step in zip(case, case[1:]):
            same = (step["top"], step["capacity"]) == (before["top"], before["capacity"])
            if same and not step["after_prefill"] and not step["probed"]:  # a probe binds its one row first
                assert step["rebinds"] == 0, step


def test_decode_steps_as_cuda_graphs_generate_what_the_engine_by_engine_steps_do():
    """``serve.cuda_graphs`` on a real GPU: the scenario's served greedy tokens with each decode step's engines
    captured once per binding and launched as one CUDA graph equal those of the steps run engine by engine,
    and TensorRT let every capture through (none refused), so the graphs really ran."""
    from tests.runtime.device_scenario import scenario
    from tests.runtime.test_device_cache import traffic_problems

    workdir = Path(os.environ["AUTOGLM_BUILD_TRT_WORKDIR"])
    on, off = scenario(workdir, "tensorrt", "fp16", graphs=True), scenario(workdir, "tensorrt", "fp16")
    for case in ("solo", "batched", "joining", "agent_alone", "agent"):
        assert on[case] == off[case], case
    counts = on["graphs"]
    assert counts["refused"] == 0 and counts["captures"] >= 10 and counts["launches"] >= 3 * counts["captures"]
    assert traffic_problems([s for case in on["steps"].values() for s in case], counted="device") == []


def test_tokens_chosen_on_the_gpu_are_the_host_samplers_and_only_their_ids_come_back():
    """``serve.device_select`` on a real GPU: TensorRT builds the select engine, and the scenario's greedy tokens
    chosen on the GPU, with each step launched on the ids the step before left there (CUDA graphs on and off),
    equal the host sampler's; seeded sampled rows get the same tokens alone and eight together, not the host
    sampler's draws; per decode step (launch to result) only ids come back, never a row of logits."""
    from tests.runtime.device_scenario import scenario

    workdir = Path(os.environ["AUTOGLM_BUILD_TRT_WORKDIR"])
    cases = ("solo", "batched", "joining", "agent", "sampled")
    host = scenario(workdir, "tensorrt", "fp16", cases=cases)
    runs = [scenario(workdir, "tensorrt", "fp16", cases=cases, select=True, graphs=graphs) for graphs in (False, True)]
    for run in runs:
        assert all(run["selecting"]), "the select engine did not load: the server's log says why"
        for case in ("solo", "batched", "joining", "agent_alone", "agent"):
            assert run[case] == host[case], case
        assert run["sampled"] == run["sampled_solo"] == runs[0]["sampled"] != host["sampled"]
        assert run["ahead"] >= 40
        for step in [s for case in run["steps"].values() for s in case]:
            assert step["device"]["d2h_bytes"] <= 4 * step["top"] * 4, step
    assert runs[1]["graphs"]["refused"] == 0 and runs[1]["graphs"]["launches"] >= 40


def _gpus() -> int:
    from autoglm_build.runtime.device import device_count

    try:
        return device_count()
    except Exception:  # noqa: BLE001 - no CUDA runtime or no device: the test says so when it skips
        return 0


def _pointer_device(ptr: int) -> int:
    """The GPU an allocation lives on (``cudaPointerGetAttributes``; CUDA >= 10's struct, with CUDA 13's
    reserved tail so that a newer runtime writes inside it, not past it)."""
    import ctypes

    from polygraphy import cuda

    class Attributes(ctypes.Structure):
        _fields_ = [("type", ctypes.c_int), ("device", ctypes.c_int), ("devicePointer", ctypes.c_void_p),
                    ("hostPointer", ctypes.c_void_p), ("reserved", ctypes.c_long * 8)]

    attributes = Attributes()
    status = cuda.wrapper().handle.cudaPointerGetAttributes(ctypes.byref(attributes), ctypes.c_void_p(ptr))
    assert status == 0, f"cudaPointerGetAttributes: CUDA error {status}"
    return attributes.device


def test_the_staged_decoder_split_across_two_gpus_generates_what_it_does_on_one(monkeypatch):
    """Issue 15's acceptance on real GPUs: served greedy generations (tests.runtime.device_scenario) with the
    decoder's stages on GPUs [0, 1] equal those on [0], on the device KV cache and on the host cache;
    each stage's engine and KV store on its own GPU, the activations crossing by peer copy."""
    from tests.runtime.device_scenario import scenario

    workdir = Path(os.environ["AUTOGLM_BUILD_TRT_WORKDIR"])
    stages = module_parts(Manifest.load(workdir).config, "decoder")
    if len(stages) < 2:
        pytest.skip(f"{workdir}: the decoder is built as one stage; needs a staged decoder's fp16 engines "
                    "(decoder.stages: 2)")
    gpus = _gpus()
    if gpus < 2:
        pytest.skip(f"needs 2 GPUs, {gpus} visible")
    one, two = scenario(workdir, "tensorrt", "fp16", [0]), scenario(workdir, "tensorrt", "fp16", [0, 1])
    for case in ("solo", "batched", "joining", "agent_alone", "agent"):  # said before any assert (a crash hides it)
        print(f"two GPUs, {case}: {'same' if two[case] == one[case] else 'DIFFERENT'}: {two[case]} vs {one[case]}",
              flush=True)
    print(f"two GPUs: caches {one['cache']} / {two['cache']}, describe {two['describe']}", flush=True)
    assert one["cache"] == two["cache"] == "DeviceKVCache"
    for case in ("solo", "batched", "joining", "agent_alone", "agent"):
        assert two[case] == one[case], case
    assert two["agent"] == two["agent_alone"] and two["prefix"]["hits"] == 2
    assert two["describe"]["placement"] == {**{u: 0 for u in two["describe"]["files"]}, **_placed(workdir, [0, 1])}
    steps = [s for case in two["steps"].values() for s in case]
    assert steps and all(s["device"]["peer_calls"] >= 1 for s in steps)  # every decode step crossed by peer copy
    assert all(s["device"]["d2h_bytes"] <= s["logits_bytes"] for s in steps)
    monkeypatch.setattr(TensorRTBackend, "kv_cache", Backend.kv_cache)
    on_host = scenario(workdir, "tensorrt", "fp16", [0, 1], ("solo", "joining"))
    assert on_host["cache"] == "KVCache" and on_host["solo"] == one["solo"] and on_host["joining"] == one["joining"]
    monkeypatch.undo()
    _check_memory_placement(workdir)


def _placed(workdir: Path, devices) -> dict:
    """Each decoder part's GPU under the placement rule (the head stage beside the last layer stage)."""
    from autoglm_build.runtime.device import stage_devices

    config = Manifest.load(workdir).config
    section = config.get("decoder") or {}
    parts = module_parts(config, "decoder")
    head = bool(section.get("head_stage"))
    return dict(zip(parts, stage_devices(devices, len(parts) - head, head)))


def _check_memory_placement(workdir: Path) -> None:
    """The KV cache's shards, and the buffers of a decode step, on the GPU of the stages they serve."""
    from autoglm_build.config import BuildConfig
    from autoglm_build.runtime.kv_cache import CacheSpec

    cfg = BuildConfig.model_validate(Manifest.load(workdir).config)
    backend = open_backend(workdir, ["embed", "decoder"], "tensorrt", "fp16", devices=[0, 1])
    try:
        spec = CacheSpec(cfg.text.num_hidden_layers, cfg.text.num_key_value_heads, cfg.text.head_dim)
        cache = backend.kv_cache(spec, 2, backend.context)
        placed = _placed(workdir, [0, 1])  # e.g. stage0 on 0, stage1 and the head stage on 1
        assert [s.device.index for s in cache.shards] == [0, 1]
        assert [s.units for s in cache.shards] == [[u for u, d in placed.items() if d == k] for k in (0, 1)]
        for shard in cache.shards:
            assert _pointer_device(shard.store_ptr) == shard.device.index
            assert _pointer_device(shard.mask_ptr) == shard.device.index
    finally:
        backend.close()

