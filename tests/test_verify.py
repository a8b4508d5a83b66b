"""verify and calibrate's gate catch a broken INT8 decoder (issue 16, item 6).

The experiment of the issue: a random bias of +-9 % of max|logit| added to the INT8 decoder's logits
(an Add in front of the graph's ``logits`` output). It used to pass ``verify --strict`` (INT8
compared with FP32 at ``1e-2 + 0.15 max|ref|``) and calibrate (no gate without ``--target-cosine``).
Now the precision graph is held against ``calibrate.gate`` (cosine, greedy agreement) by both; the
engine side (an INT8 engine against its own graph) is tests/engine/test_fake_trt.py's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from autoglm_build.cli import app
from autoglm_build.config import load_config
from autoglm_build.console import Reporter
from autoglm_build.manifest import Manifest, make_artifact
from autoglm_build.pipeline import Pipeline
from autoglm_build.stages.samples import load_samples
from tests.conftest import TINY
from tests.helpers import run_onnx

MODULES = ["embed", "decoder"]
BIAS = 0.09  # of max|logit|, as in the issue


@pytest.fixture(scope="module")
def decoder_int8(tiny_build, tmp_path_factory) -> Path:
    """The shared tiny export, optimized, with samples and the INT8 graphs of embed and decoder."""
    from autoglm_build.stages.calibrate import CalibrateStage
    from autoglm_build.stages.optimize import OptimizeStage
    from autoglm_build.stages.samples import SamplesStage

    workdir = tmp_path_factory.mktemp("verify") / "w"
    shutil.copytree(tiny_build, workdir)
    cfg = load_config(TINY)
    stages = [OptimizeStage(), SamplesStage(), CalibrateStage("int8")]
    Pipeline(cfg, workdir, stages, MODULES, reporter=Reporter(-1), config_path=str(TINY)).run()
    return workdir


@pytest.fixture
def decoder_copy(decoder_int8: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "w"
    shutil.copytree(decoder_int8, dest)
    return dest


def logit_scale(workdir: Path) -> float:
    """max|logit| of the FP32 decoder on the verification samples."""
    manifest = json.loads((workdir / "manifest.json").read_text())
    graph = next(p for p, a in manifest["artifacts"].items() if a["stage"] == "optimize" and p.endswith("decoder.onnx"))
    samples = next(p for p, a in manifest["artifacts"].items() if a["stage"] == "samples" and "decoder" in p)
    return max(float(np.abs(run_onnx(workdir / graph, step)["logits"]).max())
               for steps in load_samples(workdir / samples).values() for step in steps)


def add_logit_bias(model, scale: float, fraction: float = BIAS, seed: int = 0):
    """``logits`` <- ``logits + b``, b uniform in +-``fraction * scale`` per vocabulary entry."""
    producer = next(n for n in model.graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "logits_unbiased"
    vocab = model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    bias = np.random.default_rng(seed).uniform(-1, 1, vocab).astype(np.float32) * fraction * scale
    model.graph.initializer.append(numpy_helper.from_array(bias, "logit_bias"))
    model.graph.node.append(helper.make_node("Add", ["logits_unbiased", "logit_bias"], ["logits"], name="logit_bias"))
    return model


def break_int8_decoder(workdir: Path) -> None:
    """Bias the INT8 decoder's logits and re-record the file: a broken build its manifest trusts."""
    path = workdir / "int8" / "decoder.onnx"
    onnx.save(add_logit_bias(onnx.load(str(path)), logit_scale(workdir)), str(path))
    manifest = Manifest.load(workdir)
    record = manifest.record("calibrate-int8", "decoder")
    arts = [make_artifact(workdir, workdir / a.path, a.kind, "decoder", "calibrate-int8")
            for a in manifest.artifacts_of("calibrate-int8", "decoder")]
    manifest.put(record, arts)
    manifest.save(workdir)


def _verify(workdir: Path, *extra: str):
    return CliRunner().invoke(app, ["verify", "-w", str(workdir), "-m", "decoder", "--precision", "int8",
                                    "--strict", "--json", *extra])


@pytest.mark.parametrize("backend", ["onnxruntime", "auto"])
def test_verify_strict_passes_the_int8_decoder_and_fails_it_biased(decoder_copy, backend):
    result = _verify(decoder_copy, "--backend", backend)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert {r["batch"] for r in rows} == {1, 4, 8} and all(r["reference"] == "fp32 graph" for r in rows)
    assert all(r["output"] == "logits" and r["passed"] for r in rows), rows
    break_int8_decoder(decoder_copy)
    result = _verify(decoder_copy, "--backend", backend)
    assert result.exit_code == 3, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error: verify:")
    failed = [r for r in json.loads(result.stdout)["rows"] if not r["passed"]]
    assert failed and all(r["failures"] for r in failed), failed
    record = Manifest.load(decoder_copy).record("verify", "decoder")
    assert record.status == "failed"


def test_calibrate_gate_fails_a_biased_int8_decoder_with_exit_3(decoder_copy, monkeypatch):
    """The same bias on every graph calibrate makes: the INT8 graph misses the default gate, the
    fallback finds that even all layers in FP16 miss it, and the stage fails with its numbers."""
    from autoglm_build.stages import calibrate

    scale = logit_scale(decoder_copy)
    real = calibrate.Quantizer.__call__
    monkeypatch.setattr(calibrate.Quantizer, "__call__",
                        lambda self, *a, **k: add_logit_bias(real(self, *a, **k), scale))
    result = CliRunner().invoke(app, ["calibrate", "--int8", "-w", str(decoder_copy), "-m", "decoder", "--force"])
    assert result.exit_code == 3, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "decoder: calibrate.gate is unreachable" in errors[0], result.stderr
    record = Manifest.load(decoder_copy).record("calibrate-int8", "decoder")
    assert record.status == "failed" and "accuracy_all_fp16" in record.metrics
    assert not (decoder_copy / "int8" / "decoder.onnx").exists()


def test_calibrate_records_the_gate_it_passed(decoder_int8):
    record = Manifest.load(decoder_int8).record("calibrate-int8", "decoder")
    gate, acc = record.metrics["gate"], record.metrics["accuracy"]
    assert gate["passed"] and acc["cosine_mean"] >= gate["cosine"]
    assert acc["greedy_agreement"] >= gate["greedy_agreement"]
