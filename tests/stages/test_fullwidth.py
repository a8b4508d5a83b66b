"""Full width is real: the 9B model's widths, 2 layers per tower, exported and validated on CPU.

Deselected by default (``-m 'not fullwidth'`` in pyproject); ``make test-fullwidth`` runs it
(about 10 minutes on 2 cores, peak RSS under 24 GiB).
"""

from __future__ import annotations

import json

import onnx
import pytest

from autoglm_build.config import load_config
from autoglm_build.console import Reporter
from autoglm_build.modules import registry
from autoglm_build.pipeline import Pipeline
from autoglm_build.stages.export import ExportStage
from tests.conftest import ROOT

pytestmark = pytest.mark.fullwidth


def test_full_width_two_layer_exports_and_validates(tmp_path):
    cfg = load_config(ROOT / "configs" / "autoglm-phone-9b-2layer.yaml")
    assert (cfg.text.hidden_size, cfg.text.vocab_size, cfg.vision.hidden_size) == (4096, 151552, 1536)
    Pipeline(cfg, tmp_path, [ExportStage()], cfg.modules, reporter=Reporter(0)).run()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    units = registry.expand(cfg, cfg.modules)
    assert [u for u in units if u.startswith("decoder")] == ["decoder.stage0", "decoder.stage1"]  # layers, head
    for module in units:
        record = manifest["records"][f"export/{module}"]
        assert record["status"] == "done" and record["metrics"]["passed"], module
        assert record["metrics"]["batches"] == [1]  # the long-context slice runs at batch 1
    data = {a["module"]: a["bytes"] for a in manifest["artifacts"].values() if a["kind"] == "onnx-data"}
    assert data["decoder.stage1"] > 2**31 and data["embed"] > 2**31  # the LM head and table: past protobuf's 2 GB
    onnx.checker.check_model(str(tmp_path / "onnx" / "decoder.stage1.onnx"))
