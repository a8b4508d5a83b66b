"""``benchmarks/serve_load.py --engine-only`` on TensorRT (the fake one, tests/engine/fake_trt, whose CUDA runtime
is host memory): the engine-alone decode rate runs the tiny build's embed and decoder engines, one decoder and
a decoder in two stages, on the server's device KV cache, and per step only the ids, positions, mask elements
and the sampler's logits cross to and from the host, never the cache.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, write_config
from tests.engine.fake_trt import harness

pytestmark = pytest.mark.slow
MODULES = ["embed", "decoder"]
MAX_TOKENS = 12


@pytest.fixture(scope="module", params=[1, 2], ids=["one-decoder", "two-stages"])
def engines(request, tmp_path_factory):
    """(config, workdir, env, stages): the tiny config's embed and decoder FP16 engines built by the fake TensorRT 8.5
    (the GPU harness's version), the decoder in ``request.param`` stages (the GPU build's shape when 2)."""
    from autoglm_build.config import load_config
    from autoglm_build.console import Reporter
    from autoglm_build.pipeline import Pipeline
    from autoglm_build.stages.calibrate import CalibrateStage
    from autoglm_build.stages.export import ExportStage
    from autoglm_build.stages.optimize import OptimizeStage
    from autoglm_build.stages.samples import SamplesStage

    root = tmp_path_factory.mktemp(f"engine-rate-{request.param}")
    # two stages: and a prefill profile of 4 rows (engine.prefill_batch), so 8 rows prefill in two calls
    # (verify's samples, at most that many rows)
    staged = {"decoder": {"stages": request.param}, "engine": {"prefill_batch": 4},
              "export": {"batch_sizes": [1, 4]}} if request.param > 1 else {}
    changes = {"modules": MODULES, **staged}
    config = write_config(root / "config.yaml", changes)
    cfg, workdir = load_config(config), root / "w"
    for stages in ([ExportStage(cfg.checkpoint)], [OptimizeStage(), SamplesStage(), CalibrateStage("fp16")]):
        Pipeline(cfg, workdir, stages, MODULES, reporter=Reporter(-1), config_path=str(config)).run()
    env = harness.environment("8.5.3", "0.49.26", root / "calls.jsonl")
    built = harness.run(["-m", "autoglm_build", "engine", "-w", str(workdir), "-m", "embed", "-m", "decoder",
                         "--precision", "fp16"], env, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    return config, workdir, env, request.param


def test_engine_alone_runs_the_engines_on_the_device_cache_and_only_the_logits_come_back(engines):
    config, workdir, env, stages = engines
    out = harness.run([str(ROOT / "benchmarks" / "serve_load.py"), "--engine-only", "-c", str(config), "-w",
                       str(workdir), "--backend", "tensorrt", "--max-tokens", str(MAX_TOKENS)], env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert (result["backend"], result["precision"]) == ("tensorrt", "fp16")
    assert "DeviceKVCache" in result["what"]
    units = ["decoder"] if stages == 1 else [f"decoder.stage{k}" for k in range(stages)]
    for batch, rate in ((1, result["rates"]["1"]), (8, result["rates"]["8"])):
        steps, moved = rate["steps"], rate["traffic"]
        assert rate["cache"] == "DeviceKVCache" and rate["units"] == units
        assert rate["prefill_rows"] == (min(batch, 4) if stages > 1 else batch)
        assert steps == MAX_TOKENS - 1 and rate["tokens_per_s"] > 0
        assert rate["tokens_per_s"] == pytest.approx(batch * steps / rate["seconds"])
        # one download per step, of the sampler's candidate logits of the batch's rows, and nothing else
        assert moved["d2h_calls"] == steps and moved["d2h_bytes"] == steps * rate["logits_bytes"]
        # up: ids, positions and a mask element per row (5 x 8 bytes) a step, and at most one whole mask
        mask = batch * (rate["capacity"] + 1) * 8
        assert 0 < moved["h2d_bytes"] <= steps * 5 * 8 * batch + mask
        assert max(moved["h2d_bytes"], moved["d2h_bytes"]) / steps < rate["cache_bytes"]
        # each row's new column into its slot, on the device: the batch's rows (one prompt, so one column) in one
        # 3-D copy and their mask elements in one 2-D copy a step, whatever the batch
        assert steps * 2 <= moved["d2d_calls"] < steps * 2 + steps // 4
        assert rate["rebinds"] <= 1  # the embed engine's one context, which the prefill bound last
