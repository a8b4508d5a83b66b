"""The runtime tests' shared fixture: the tiny build's ONNX Runtime backend and chat tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoglm_build.calibration import tokenizer_for
from autoglm_build.runtime.backends import open_backend
from autoglm_build.runtime.text import ChatTokenizer
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def runtime(tiny_build: Path):
    """(config, backend, tokenizer) on the shared tiny build, one backend per test module."""
    from autoglm_build.config import load_config

    cfg = load_config(ROOT / "configs" / "autoglm-phone-tiny.yaml")
    backend = open_backend(tiny_build, cfg.modules, "onnxruntime")
    tokenizer = ChatTokenizer(tokenizer_for(cfg)[0], cfg.text.vocab_size)
    yield cfg, backend, tokenizer
    backend.close()
