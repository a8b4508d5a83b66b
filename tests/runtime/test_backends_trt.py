"""On a machine with TensorRT and a GPU (the device harness): the bound call `bench` times computes
what Polygraphy's `infer` computes, for each profile of the tiny engines.

Needs a workdir whose fp16 engines were built there: ``AUTOGLM_BUILD_TRT_WORKDIR``.
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
from autoglm_build.runtime.backends import TensorRTBackend
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
