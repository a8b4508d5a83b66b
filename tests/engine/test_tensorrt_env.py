"""engine.tensorrt and the engine stage's version handling, on stand-in modules (no TensorRT needed)."""

from __future__ import annotations

import enum
from types import SimpleNamespace

import numpy as np
import pytest

from autoglm_build.engine import tensorrt as trt_env
from autoglm_build.errors import EXIT_ENVIRONMENT, EnvironmentMissing, UserError
from autoglm_build.stages.engine import BuildChildError, _raise_child_failure, tactic_sources


@pytest.mark.parametrize("trt, polygraphy", [("8.5.3.1", "0.49.26"), ("10.13.0", "0.49.26"), ("10.3.0", "0.49.1"),
                                             ("11.1.0", "0.50.3"), ("11.4.0", "0.53.6")])
def test_working_pairs_pass(trt, polygraphy):
    trt_env.check_pair(trt, polygraphy)


@pytest.mark.parametrize("trt, polygraphy, why", [
    ("11.1.0", "0.49.26", "precision_is_set"),
    ("11.0.0", "0.50.2", "precision_is_set"),
    ("10.0.1", "0.48.1", "progress_monitor"),
])
def test_pairs_known_not_to_work_are_an_environment_error(trt, polygraphy, why):
    with pytest.raises(EnvironmentMissing, match=why) as info:
        trt_env.check_pair(trt, polygraphy)
    assert info.value.exit_code == EXIT_ENVIRONMENT and "\n" not in info.value.message


@pytest.mark.parametrize("version, strong", [("8.5.3.1", False), ("10.0.1", False), ("10.11.0", False),
                                             ("10.12.0", True), ("11.1.0", True)])
def test_strong_typing_from_10_12(version, strong):
    assert trt_env.strongly_typed(SimpleNamespace(__version__=version)) is strong


def test_numpy_dtype_refuses_types_numpy_lacks():
    DataType = enum.Enum("DataType", ["FLOAT", "HALF", "BF16", "FP8", "INT4", "FP4", "INT64"])
    trt = SimpleNamespace(DataType=DataType)
    assert trt_env.numpy_dtype(trt, DataType.HALF) is np.float16
    assert trt_env.numpy_dtype(trt, DataType.INT64) is np.int64
    for name in ("BF16", "FP8", "INT4", "FP4"):
        with pytest.raises(UserError, match=f"tensor 'logits' is of TensorRT type {name}, which has no numpy type"):
            trt_env.numpy_dtype(trt, DataType[name], "logits")


def test_tactic_sources_by_name():
    old = SimpleNamespace(TacticSource=enum.Enum("TacticSource", ["CUBLAS", "CUBLAS_LT", "CUDNN"]))
    new = SimpleNamespace(TacticSource=enum.Enum("TacticSource", ["EDGE_MASK_CONVOLUTIONS", "JIT_CONVOLUTIONS"]))
    assert tactic_sources(old, "cublas") == [old.TacticSource.CUBLAS, old.TacticSource.CUBLAS_LT]
    assert tactic_sources(new, "cublas") is None  # TensorRT 11: no cuBLAS tactic source, the default
    assert tactic_sources(new, "none") == [] and tactic_sources(new, "default") is None
    with pytest.raises(UserError, match="AUTOGLM_BUILD_TRT_TACTICS: 'cudnn' is not one of"):
        tactic_sources(old, "cudnn")


def test_build_child_failures_keep_their_kind():
    with pytest.raises(UserError) as info:
        _raise_child_failure("user-error", {"message": "no", "hint": None, "exit_code": EXIT_ENVIRONMENT})
    assert info.value.exit_code == EXIT_ENVIRONMENT
    with pytest.raises(BuildChildError, match=r"TypeError: boom(.|\n)*Traceback in child"):
        _raise_child_failure("exception", {"type": "TypeError", "message": "boom", "traceback": "Traceback in child"})
