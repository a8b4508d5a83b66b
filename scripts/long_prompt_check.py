"""A long prompt (more tokens than one prefill call takes) generated on two backends of one build.

    python scripts/long_prompt_check.py -c CONFIG -w WORKDIR [--tokens 5000] [--backends tensorrt,onnxruntime]

The TensorRT engine's prefill profile takes ``engine.prefill_chunk`` tokens a call, so the prompt is
prefilled in chunks there; ONNX Runtime takes it in one call. Prints each backend's greedy tokens and
the time to the first token, and how many of the tokens agree.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from autoglm_build.calibration import tokenizer_for
from autoglm_build.config import load_config
from autoglm_build.runtime.backends import open_backend
from autoglm_build.runtime.generation import Request, SamplingParams, Scheduler
from autoglm_build.runtime.text import ChatTokenizer, Segment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("-w", "--workdir", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=5000)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--backends", default="tensorrt,onnxruntime")
    args = parser.parse_args()
    cfg = load_config(args.config)
    tok = ChatTokenizer(tokenizer_for(cfg)[0], cfg.text.vocab_size)
    text = "在小红书上搜索成都旅游攻略, then open the settings app and turn on dark mode. " * (args.tokens // 10)
    prompt = tok.chat_prompt([("user", [Segment(text=text)])], False)
    prompt.ids, prompt.positions = prompt.ids[-args.tokens:], prompt.positions[:, -args.tokens:]
    prompt.positions = prompt.positions - prompt.positions[0, 0]
    results = {}
    for name in args.backends.split(","):
        backend = open_backend(args.workdir, ["embed", "decoder"], name)
        unchunked = cfg.engine.context if name == "onnxruntime" else None
        scheduler = Scheduler(backend, cfg, tok, max_batch=1, queue_size=1, context=cfg.engine.context,
                              prefill_chunk=unchunked)
        req = Request(prompt, SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True), emit=lambda e: None)
        start = time.perf_counter()
        scheduler.submit(req)
        scheduler.run_until_idle()
        results[name] = req.token_ids
        print(f"{name} {backend.precision}: {len(prompt.ids)} prompt tokens, prefill chunk {scheduler.prefill_chunk}, "
              f"first token {1e3 * (req.first_token - start):.1f} ms, tokens {req.token_ids}")
        backend.close()
    if len(results) == 2:
        a, b = results.values()
        print(f"agreeing greedy tokens: {sum(x == y for x, y in zip(a, b))}/{len(a)} (first divergence at "
              f"{next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))})")


if __name__ == "__main__":
    main()
