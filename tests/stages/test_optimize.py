"""optimize: op counts before/after, checked equal to the export, fusions by opset."""

from __future__ import annotations

import json

import onnx
import pytest

from autoglm_build.config import load_config
from autoglm_build.console import Reporter
from autoglm_build.errors import UserError
from autoglm_build.pipeline import Pipeline
from autoglm_build.stages.calibrate import CalibrateStage
from autoglm_build.stages.optimize import OptimizeStage
from tests.conftest import write_config


def _run(cfg, workdir, stages, modules):
    return Pipeline(cfg, workdir, stages, modules, reporter=Reporter(-1)).run()


def test_optimize_reports_op_counts_and_matches_the_export(tiny_build_copy, tiny_cfg):
    outcomes = _run(tiny_cfg, tiny_build_copy, [OptimizeStage()], tiny_cfg.modules)
    for o in outcomes:
        m = o.record.metrics
        assert m["passed"] and m["max_abs"] < 1e-5 and m["batches"] == [1, 4, 8]
        assert m["nodes_before"] - m["nodes_after"] == m["nodes_removed"]
        assert sum(m["ops_before"].values()) == m["nodes_before"]
        assert m["rewrites"]["fuse-gelu"].startswith("skipped: needs opset >= 20")
        assert m["rewrites"]["fuse-attention"].startswith("skipped: needs opset >= 23")
        # vision and decoder: each layer's scale moved onto Q; Whisper's q_proj already scales Q
        assert m["rewrites"]["scale-query-first"] == {"vision": 2, "decoder": 2}.get(o.module, 0)
        model = onnx.load(str(tiny_build_copy / "optimized" / f"{o.module}.onnx"))
        assert model.opset_import[0].version == 17
    decoder = next(o for o in outcomes if o.module == "decoder").record.metrics
    assert decoder["nodes_removed"] > 300 and "Constant" not in decoder["ops_after"]


def test_higher_opset_fuses_into_standard_ops_and_calibrates_from_them(tiny_build_copy, tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", {"optimize": {"opset": 20}}))
    (o,) = _run(cfg, tiny_build_copy, [OptimizeStage(), CalibrateStage("int8")], ["audio"])[:1]
    assert o.record.metrics["rewrites"]["fuse-gelu"] == 5
    assert o.record.metrics["ops_after"]["Gelu"] == 5 and "Erf" not in o.record.metrics["ops_after"]
    manifest = json.loads((tiny_build_copy / "manifest.json").read_text())
    assert manifest["records"]["calibrate-int8/audio"]["params"]["source"].endswith("optimized/audio.onnx")


def test_int8_refuses_opset_above_20(tiny_build_copy, tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", {"optimize": {"opset": 23}}))
    (o,) = _run(cfg, tiny_build_copy, [OptimizeStage()], ["vision"])
    m = o.record.metrics  # the vision tower's attention fused, checked equal to the export at batch 1/4/8
    assert m["passed"] and m["rewrites"]["fuse-attention"] == 2 and m["ops_after"]["Attention"] == 2
    assert "Softmax" not in m["ops_after"] and m["rewrites"]["scale-query-first"] == 0
    with pytest.raises(UserError, match="INT8 calibration needs opset <= 20"):
        _run(cfg, tiny_build_copy, [CalibrateStage("int8")], ["vision"])
