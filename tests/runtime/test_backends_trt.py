"""On a machine with TensorRT and a GPU (the device harness): the bound call `bench` times computes
what Polygraphy's `infer` computes, for each profile of the tiny engines; the device-resident KV cache
serves what the host cache serves and keeps the cache on the GPU.

Needs a workdir whose fp16 engines were built there: ``AUTOGLM_BUILD_TRT_WORKDIR`` (the device cache's
test: vision, embed and decoder engines, and the vision samples).
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
from autoglm_build.runtime.backends import Backend, TensorRTBackend
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
            if (step["top"], step["capacity"]) == (before["top"], before["capacity"]) and not step["after_prefill"]:
                assert step["rebinds"] == 0, step
