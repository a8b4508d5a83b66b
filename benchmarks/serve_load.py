"""Load on ``autoglm-build serve`` over loopback: N concurrent streaming clients, batched vs one at a time.

Starts the server twice on 127.0.0.1 over the same build — ``--max-batch 1`` (one request at a
time) and ``--max-batch 8`` (the engines' profile) — sends the same N concurrent streaming chat
requests (real ``openai`` AsyncOpenAI clients) to each, and prints errors, time to first token
p50/p99 and generated tokens/s side by side. Stops by itself (``--timeout`` bounds every phase).

    python benchmarks/serve_load.py [-w build/autoglm-phone-tiny] [--clients 64] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from openai import AsyncOpenAI

from autoglm_build.serve.launch import serve_process

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def server(args, max_batch: int):
    serve_args = ["-c", args.config, "-w", args.workdir, "--backend", args.backend, "--max-batch", str(max_batch),
                  "--queue-size", str(args.clients), "-q"]
    with contextlib.ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve-load-")))
        try:
            url, _, _ = stack.enter_context(serve_process(serve_args, logs, ready_timeout=120))
        except RuntimeError as exc:  # exited or not ready: the log's tail, no traceback
            raise SystemExit(str(exc)) from None
        yield url


async def one_client(client: AsyncOpenAI, i: int, args) -> dict:
    start = time.perf_counter()
    first, tokens = None, 0
    stream = await client.chat.completions.create(
        model="autoglm-phone-9b", messages=[{"role": "user", "content": f"第{i}个请求: 打开设置并开启深色模式"}],
        max_tokens=args.max_tokens, temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"ttft": first if first is not None else time.perf_counter() - start, "tokens": tokens,
            "latency": time.perf_counter() - start}


async def phase(url: str, args) -> dict:
    client = AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=args.timeout)
    start = time.perf_counter()
    results = await asyncio.wait_for(
        asyncio.gather(*(one_client(client, i, args) for i in range(args.clients)), return_exceptions=True),
        timeout=args.timeout)
    wall = time.perf_counter() - start
    await client.close()
    ok = [r for r in results if isinstance(r, dict)]
    errors = [r for r in results if not isinstance(r, dict)]
    ttft = np.array([r["ttft"] for r in ok]) if ok else np.array([np.nan])
    tokens = sum(r["tokens"] for r in ok)
    stats = httpx.get(url + "/ready").json()
    return {"clients": args.clients, "errors": len(errors), "first_error": repr(errors[0]) if errors else "",
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "decode_steps": stats["decode_steps"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=str(ROOT / "configs" / "autoglm-phone-tiny.yaml"))
    parser.add_argument("-w", "--workdir", default=str(ROOT / "build" / "autoglm-phone-tiny"))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per phase before giving up")
    args = parser.parse_args()

    rows = {}
    for label, batch in (("one at a time (--max-batch 1)", 1), ("batched (--max-batch 8)", 8)):
        with server(args, batch) as url:
            rows[label] = asyncio.run(phase(url, args))
    print(f"{args.clients} concurrent streaming clients, {args.max_tokens} tokens each, loopback, {args.backend}")
    print(f"{'':32} {'errors':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'tokens/s':>9} {'wall s':>7} {'steps':>6}")
    for label, r in rows.items():
        print(f"{label:32} {r['errors']:>6} {r['ttft_p50']:>8.3f}s {r['ttft_p99']:>8.3f}s {r['tokens_per_s']:>9.1f} "
              f"{r['wall_s']:>7.2f} {r['decode_steps']:>6}")
        if r["first_error"]:
            print(f"  first error: {r['first_error']}")
    one, many = rows.values()
    print(f"batching speedup (tokens/s, batched/one at a time): {many['tokens_per_s'] / one['tokens_per_s']:.2f}x")
    return 1 if one["errors"] or many["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
