"""Decode on this CPU: ONNX Runtime with the exported KV cache vs transformers' eager ``generate``.

Same weights on both sides: transformers' ``Glm4vForConditionalGeneration`` is built from the
config and given the weights the export stage builds (seeded, or the checkpoint's), and the ONNX
side is the workdir's exported ``embed`` + ``decoder`` run by the server's own batched generation
loop (:class:`autoglm_build.runtime.generation.Scheduler`). Greedy over the full vocabulary on both
sides, the same prompt, ``--tokens`` new tokens (EOS ignored), at batch 1 and 8; prints tokens/s
side by side, how many generated tokens agree, and ends with the speedup line.

    python benchmarks/decode_cpu.py [-c configs/autoglm-phone-tiny.yaml] [-w build/autoglm-phone-tiny]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from autoglm_build.calibration import tokenizer_for
from autoglm_build.config import load_config
from autoglm_build.manifest import Manifest
from autoglm_build.modules import registry
from autoglm_build.modules.hf_configs import glm4v_config
from autoglm_build.runtime.backends import OnnxRuntimeBackend
from autoglm_build.runtime.generation import Request, SamplingParams, Scheduler
from autoglm_build.runtime.text import ChatTokenizer, Segment
from autoglm_build.stages.base import StageContext
from autoglm_build.stages.export import ExportStage

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "帮我在美团上点一份宫保鸡丁外卖"


def transformers_model(cfg, workdir: Path):
    """Glm4vForConditionalGeneration holding exactly the weights our embed/decoder were exported with."""
    from transformers import Glm4vForConditionalGeneration

    ctx = StageContext(cfg, workdir, Manifest())
    stage = ExportStage(Path(cfg.checkpoint) if cfg.checkpoint else None)
    decoder = stage.build_module(ctx, registry.get("decoder"))[0]
    embed = stage.build_module(ctx, registry.get("embed"))[0]
    model = Glm4vForConditionalGeneration(glm4v_config(cfg)).eval()
    state = {"model." + k: v for k, v in decoder.state_dict().items() if k.startswith("language_model.")}
    state["lm_head.weight"] = decoder.state_dict()["lm_head.weight"]
    state["model.language_model.embed_tokens.weight"] = embed.state_dict()["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("model.visual.") for k in missing), (missing[:3], unexpected[:3])
    return model


def hf_generate(model, ids: list, batch: int, tokens: int):
    input_ids = torch.tensor([ids] * batch)
    mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        wall = time.perf_counter() - start
    return out[:, len(ids):].numpy(), wall


def ort_generate(scheduler: Scheduler, tok: ChatTokenizer, batch: int, tokens: int):
    prompt = tok.chat_prompt([("user", [Segment(text=PROMPT)])], thinking=False)

    def requests(n):
        return [Request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), emit=lambda e: None)
                for _ in range(batch)]

    for req in requests(2):  # warm-up
        scheduler.submit(req)
    scheduler.run_until_idle()
    reqs = requests(tokens)
    start = time.perf_counter()
    for req in reqs:
        scheduler.submit(req)
    scheduler.run_until_idle()
    wall = time.perf_counter() - start
    return np.array([r.token_ids for r in reqs]), wall, prompt.ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=str(ROOT / "configs" / "autoglm-phone-tiny.yaml"))
    parser.add_argument("-w", "--workdir", default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    cfg = load_config(Path(args.config))
    workdir = Path(args.workdir or ROOT / "build" / cfg.name)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    tok = ChatTokenizer(tokenizer_for(cfg)[0], cfg.text.vocab_size)
    tok.allowed[:] = True  # greedy over the full vocabulary, as transformers' generate
    backend = OnnxRuntimeBackend(workdir, Manifest.load(workdir), ["embed", "decoder"], "fp32")
    scheduler = Scheduler(backend, cfg, tok, max_batch=8, queue_size=64, context=cfg.engine.context)
    model = transformers_model(cfg, workdir)

    print(f"decode on CPU ({torch.get_num_threads()} threads), {cfg.name}, {args.tokens} new tokens, greedy")
    print(f"{'batch':>5} {'transformers tok/s':>19} {'onnxruntime tok/s':>18} {'speedup':>8} {'same tokens':>12}")
    ratios = []
    for batch in [int(b) for b in args.batches.split(",")]:
        ours, ort_wall, ids = ort_generate(scheduler, tok, batch, args.tokens)
        theirs, hf_wall = hf_generate(model, ids, batch, args.tokens)
        hf_rate, ort_rate = batch * args.tokens / hf_wall, batch * args.tokens / ort_wall
        agree = float((ours == theirs).mean())
        ratios.append(ort_rate / hf_rate)
        print(f"{batch:>5} {hf_rate:>19.1f} {ort_rate:>18.1f} {ort_rate / hf_rate:>7.2f}x {100 * agree:>11.1f}%")
    print(f"decode speedup onnxruntime/transformers: {ratios[0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
