"""``autoglm-build serve`` on loopback against its own decoder: decode tokens/s at 1 and 8 streams.

For each stream count (1, then 8) it first times the engine alone at that batch: the build's decoder
(the backend the server picks) run directly on the same shapes the server will see (the clients'
prompt length, then ``--max-tokens - 1`` decode steps with the cache fed back as the backend's own
values, no embedding, no sampling, no copies to numpy). Then it sends that many concurrent streaming
chat requests (sampled with seeds, EOS ignored; httpx reading the SSE lines, so the client takes little
CPU from the server) to one server started with ``--max-batch 8`` and measures its decode rate as the
clients see it: tokens after each stream's first, over the time from the first stream's first token to
the last stream's end. Last, a load phase: ``--clients`` concurrent streams of real ``openai``
AsyncOpenAI clients (errors, TTFT p50/p99, tokens/s). Ends with the line
``serve/engine decode rate: <ratio>`` at batch 8.

``--agent SESSIONSxSTEPS`` replays the phone agent instead (issue 12's contract): each session sends,
step after step, the system prompt, its history (earlier user turns without their screenshot, earlier
replies as ``<think>..</think><answer>..</answer>``) and a new full-size screenshot, all sessions at
once; once against a server with prefix reuse and once against one without
(``$AUTOGLM_BUILD_PREFIX_CACHE_MIB=0``), printing TTFT p50/p99 (all steps, and the steps after each
session's first), the prompt tokens the decoder ran and those it reused, tokens/s and errors.

    python benchmarks/serve_load.py [-w build/autoglm-phone-tiny] [--max-tokens 128] [--clients 64]
    python benchmarks/serve_load.py --agent 8x5 [--agent-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from openai import AsyncOpenAI

from autoglm_build.serve.launch import serve_process

ROOT = Path(__file__).resolve().parents[1]
MESSAGE = "第{}个请求: 打开设置并开启深色模式"


@contextlib.contextmanager
def server(args, max_batch: int, env=None):
    serve_args = ["-c", args.config, "-w", args.workdir, "--backend", args.backend, "--max-batch", str(max_batch),
                  "--queue-size", str(max(args.clients, 8)), "-q"]
    with contextlib.ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve-load-")))
        try:
            url, _, _ = stack.enter_context(serve_process(serve_args, logs, env, ready_timeout=120))
        except RuntimeError as exc:  # exited or not ready: the log's tail, no traceback
            raise SystemExit(str(exc)) from None
        yield url


# ---- the engine alone --------------------------------------------------------------------------


def prompt_length(args) -> int:
    """Tokens of the clients' prompt (as the server builds it)."""
    from autoglm_build.calibration import tokenizer_for
    from autoglm_build.config import load_config
    from autoglm_build.runtime.text import ChatTokenizer, Segment

    cfg = load_config(Path(args.config))
    tok = ChatTokenizer(tokenizer_for(cfg)[0], cfg.text.vocab_size)
    return len(tok.chat_prompt([("user", [Segment(text=MESSAGE.format(0))])], False).ids)


def engine_rate(backend, cfg, batch: int, prompt: int, steps: int) -> float:
    """Decode tokens/s of the decoder alone: ``steps`` steps at ``batch`` after a ``prompt``-token prefill,
    each step's ``present_*`` bound as the next step's ``past_*`` (ONNX Runtime IOBinding; nothing goes
    to numpy). The attention mask and positions of every step are made beforehand."""
    from onnxruntime import OrtValue

    session = backend.sessions["decoder"]
    dtypes = {i.name: np.float16 if i.type == "tensor(float16)" else np.float32 for i in session.get_inputs()}
    t = cfg.text
    rng = np.random.default_rng(0)
    embeds = (0.02 * rng.standard_normal((batch, prompt, t.hidden_size))).astype(dtypes["inputs_embeds"])
    past = {n: np.zeros((batch, t.num_key_value_heads, 0, t.head_dim), dtypes[n]) for n in dtypes
            if n.startswith("past_")}
    feed = {"inputs_embeds": embeds, "attention_mask": np.ones((batch, prompt), np.int64),
            "position_ids": np.broadcast_to(np.arange(prompt), (batch, 3, prompt)).copy(), **past}
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(names, feed)))
    values = {n.replace("present_", "past_"): OrtValue.ortvalue_from_numpy(v) for n, v in out.items()
              if n.startswith("present_")}
    step_embeds = np.ascontiguousarray(embeds[:, -1:])
    masks = [np.ones((batch, prompt + k + 1), np.int64) for k in range(steps)]
    positions = [np.full((batch, 3, 1), prompt + k, np.int64) for k in range(steps)]
    binding = session.io_binding()
    start = time.perf_counter()
    for k in range(steps):
        binding.bind_cpu_input("inputs_embeds", step_embeds)
        binding.bind_cpu_input("attention_mask", masks[k])
        binding.bind_cpu_input("position_ids", positions[k])
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        outs = dict(zip(names, binding.get_outputs()))
        values = {n: outs[n.replace("past_", "present_")] for n in values}
    return batch * steps / (time.perf_counter() - start)


# ---- the server --------------------------------------------------------------------------------


async def one_client(client: AsyncOpenAI, i: int, max_tokens: int, timeout: float) -> dict:
    start = time.perf_counter()
    first, tokens = None, 0
    stream = await client.chat.completions.create(
        model="autoglm-phone-9b", messages=[{"role": "user", "content": MESSAGE.format(i)}],
        max_tokens=max_tokens, temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"start": start, "first": first if first is not None else end, "end": end, "tokens": tokens}


async def light_client(http: httpx.AsyncClient, i: int, max_tokens: int, timeout: float) -> dict:
    """The same request as :func:`one_client`, its SSE lines only scanned: on a 2-core machine the openai
    SDK's per-chunk parsing takes CPU from the server being measured."""
    body = {"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": MESSAGE.format(i)}],
            "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body, timeout=timeout) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if first is None and '"content": "' in line and '"content": ""' not in line:
                first = time.perf_counter()
            if '"completion_tokens"' in line:
                tokens = json.loads(line[len("data: "):])["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"start": start, "first": first if first is not None else end, "end": end, "tokens": tokens}


async def phase(url: str, clients: int, max_tokens: int, timeout: float, light: bool = True) -> dict:
    client = AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=timeout)
    http = httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=max(clients, 8)))
    start = time.perf_counter()
    calls = (light_client(http, i, max_tokens, timeout) if light else one_client(client, i, max_tokens, timeout)
             for i in range(clients))
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=timeout)
    wall = time.perf_counter() - start
    await client.close()
    await http.aclose()
    ok = [r for r in results if isinstance(r, dict)]
    errors = [r for r in results if not isinstance(r, dict)]
    ttft = np.array([r["first"] - r["start"] for r in ok]) if ok else np.array([np.nan])
    decode_window = max(r["end"] for r in ok) - min(r["first"] for r in ok) if ok else 0.0
    stats = httpx.get(url + "/ready").json()
    return {"clients": clients, "errors": len(errors), "first_error": repr(errors[0]) if errors else "",
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
            "tokens": sum(r["tokens"] for r in ok), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "decode_per_s": sum(max(r["tokens"] - 1, 0) for r in ok) / decode_window if decode_window else np.nan,
            "decode_steps": stats["decode_steps"]}


# ---- the phone agent's sessions ----------------------------------------------------------------

SCREENS = ROOT / "calibration_data" / "images"
RULES = ("你是一个手机操作助手, 根据用户的任务和当前屏幕截图, 每一步只输出一个操作。先在 <think> 中说明你看到了什么、"
         "下一步为什么这样做, 再在 <answer> 中给出操作。可用的操作: do(action=\"Launch\", app=\"应用名\"); "
         "do(action=\"Tap\", element=[x,y]), 坐标范围 0 到 999; do(action=\"Type\", text=\"文字\"); "
         "do(action=\"Swipe\", start=[x1,y1], end=[x2,y2]); do(action=\"Back\"); do(action=\"Home\"); "
         "finish(message=\"结果\")。规则: 先确认当前应用是否正确; 页面没有加载完成时等待; 找不到目标时先滑动查找; "
         "登录、支付、验证码等敏感操作交给用户接管; 每一步只执行一个操作。\n")
ACTION = 'do(action="Tap", element=[500, 300])'


def agent_system_prompt() -> str:
    """Our own text in the shape of the client's: today's date, then rules, about 3.4K characters."""
    text = f"今天的日期是: {datetime.date.today():%Y年%m月%d日}\n"
    while len(text) < 3400:
        text += RULES
    return text


def agent_screens(sessions: int, steps: int) -> list:
    """``[session][step]`` PNG data URLs: the calibration phone screens (1080x2400), each marked with a
    square of its own colour, so no two requests send the same screenshot (as on a phone)."""
    from PIL import Image

    screens = sorted(SCREENS.glob("screen_*.png"))
    out = []
    for s in range(sessions):
        row = []
        for k in range(steps):
            img = Image.open(screens[(s + k) % len(screens)]).convert("RGB")
            img.paste((40 * s % 256, 40 * k % 256, 128), (60, 60, 260, 260))
            buffer = io.BytesIO()
            img.save(buffer, format="PNG")
            row.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
        out.append(row)
    return out


async def agent_step(http: httpx.AsyncClient, messages: list, max_tokens: int) -> dict:
    """One streamed step with the client's sampling; TTFT at the first chunk with text (special tokens
    shown and EOS ignored, so every step's first token and its length are the same work both ways)."""
    body = {"model": "autoglm-phone-9b", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "top_p": 0.85, "frequency_penalty": 0.2, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True, "skip_special_tokens": False}
    start, first, content, usage = time.perf_counter(), None, "", {}
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            text = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if text and first is None:
                first = time.perf_counter()
            content += text or ""
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "end": end, "content": content, "tokens": usage["completion_tokens"],
            "prompt_tokens": usage["prompt_tokens"]}


async def agent_session(http: httpx.AsyncClient, screens: list, max_tokens: int) -> list:
    """One session's steps, in order; each step's history is what the client would send back."""
    messages, results = [{"role": "system", "content": agent_system_prompt()}], []
    for k, screen in enumerate(screens):
        task = "打开设置, 开启蓝牙并返回桌面" if k == 0 else "** Screen Info **"
        text = f"{task}\n\n{{\"current_app\": \"System Settings\"}}"
        messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": screen}},
                                                     {"type": "text", "text": text}]})
        result = await agent_step(http, messages, max_tokens)
        results.append({**result, "step": k})
        messages[-1]["content"] = messages[-1]["content"][1:]  # the client drops the screenshot
        reply = f"<think>{result['content']}</think><answer>{ACTION}</answer>"
        messages.append({"role": "assistant", "content": reply})
    return results


async def agent_phase(url: str, screens: list, max_tokens: int, timeout: float) -> dict:
    """Every session at once; TTFT over all steps and over the steps after the first."""
    http = httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=len(screens) + 4))
    start = time.perf_counter()
    sessions = await asyncio.wait_for(asyncio.gather(*(agent_session(http, row, max_tokens) for row in screens),
                                                     return_exceptions=True), timeout=timeout)
    wall = time.perf_counter() - start
    await http.aclose()
    steps = [r for s in sessions if isinstance(s, list) for r in s]
    errors = [s for s in sessions if not isinstance(s, list)]
    stats = httpx.get(url + "/ready").json()

    def pct(values, q):
        return float(np.percentile(values, q)) if values else float("nan")

    ttft = [r["ttft"] for r in steps]
    later = [r["ttft"] for r in steps if r["step"] > 0]
    return {"steps": len(steps), "errors": len(errors), "first_error": repr(errors[0]) if errors else "",
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "later_p50": pct(later, 50),
            "later_p99": pct(later, 99), "prompt_tokens": sum(r["prompt_tokens"] for r in steps),
            "prefilled": stats["prefill_tokens"], "reused": stats["prefix_cache"]["tokens_reused"],
            "tokens_per_s": sum(r["tokens"] for r in steps) / wall, "wall_s": wall,
            "contents": [[r["content"] for r in s] if isinstance(s, list) else None for s in sessions]}


def agent_main(args, cfg) -> int:
    sessions, steps = (int(x) for x in args.agent.lower().split("x"))
    screens = agent_screens(sessions, steps)
    results = {}
    for mode, env in (("on", {}), ("off", {"AUTOGLM_BUILD_PREFIX_CACHE_MIB": "0"})):
        with server(args, 8, env) as url:
            asyncio.run(phase(url, 1, 4, args.timeout))  # warm-up (no system prompt: nothing reused from it)
            results[mode] = asyncio.run(agent_phase(url, screens, args.agent_tokens, args.timeout))
    on, off = results["on"], results["off"]
    print(f"phone agent, {cfg.name}, {args.backend}: {sessions} concurrent sessions x {steps} steps, one "
          f"1080x2400 screenshot per step, {args.agent_tokens} new tokens per step, server --max-batch 8")
    print(f"{'prefix reuse':>12} {'TTFT p50':>9} {'TTFT p99':>9} {'steps>1 p50':>12} {'steps>1 p99':>12} "
          f"{'prompt tok':>11} {'prefilled':>10} {'reused':>8} {'tok/s':>7} {'errors':>7}")
    for mode, r in results.items():
        print(f"{mode:>12} {r['ttft_p50']:>8.3f}s {r['ttft_p99']:>8.3f}s {r['later_p50']:>11.3f}s "
              f"{r['later_p99']:>11.3f}s {r['prompt_tokens']:>11} {r['prefilled']:>10} {r['reused']:>8} "
              f"{r['tokens_per_s']:>7.1f} {r['errors']:>7}")
        if r["first_error"]:
            print(f"  first error: {r['first_error']}")
    same = on["contents"] == off["contents"]
    print(f"replies equal with and without reuse: {'yes' if same else 'NO'}")
    print(f"TTFT p50 without/with reuse: {off['ttft_p50'] / on['ttft_p50']:.2f}x")
    return 1 if on["errors"] or off["errors"] or not same else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=str(ROOT / "configs" / "autoglm-phone-tiny.yaml"))
    parser.add_argument("-w", "--workdir", default=str(ROOT / "build" / "autoglm-phone-tiny"))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per stream in the 1 and 8 stream phases")
    parser.add_argument("--clients", type=int, default=64, help="streams of the load phase (0: none)")
    parser.add_argument("--load-tokens", type=int, default=64, help="tokens per stream in the load phase")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per phase before giving up")
    parser.add_argument("--agent", help="SESSIONSxSTEPS: replay the phone agent with and without prefix reuse "
                        "(instead of the decode phases)")
    parser.add_argument("--agent-tokens", type=int, default=32, help="new tokens per agent step")
    args = parser.parse_args()

    from autoglm_build.config import load_config
    from autoglm_build.runtime.backends import open_backend

    cfg = load_config(Path(args.config))
    if args.agent:
        return agent_main(args, cfg)
    backend = open_backend(Path(args.workdir), ["embed", "decoder"], args.backend)
    if backend.name != "onnxruntime":
        raise SystemExit(f"the engine-alone decode loop is written for ONNX Runtime; this backend is {backend.name}")
    prompt = prompt_length(args)
    engine, served = {}, {}
    with server(args, 8) as url:
        asyncio.run(phase(url, 1, 4, args.timeout))  # warm-up
        for streams in (1, 8):
            engine[streams] = engine_rate(backend, cfg, streams, prompt, args.max_tokens - 1)
            served[streams] = asyncio.run(phase(url, streams, args.max_tokens, args.timeout))
        load = asyncio.run(phase(url, args.clients, args.load_tokens, args.timeout, light=False)) \
            if args.clients else None
    backend.close()

    d = backend.describe()
    print(f"decode, {cfg.name}, {d['backend']} {d['precision']}, prompt {prompt} tokens, {args.max_tokens} new "
          f"tokens per stream, server --max-batch 8 on loopback")
    print(f"{'streams':>7} {'server tok/s':>13} {'engine tok/s':>13} {'serve/engine':>13} {'errors':>7} "
          f"{'TTFT p50':>9}")
    for streams, r in served.items():
        print(f"{streams:>7} {r['decode_per_s']:>13.1f} {engine[streams]:>13.1f} "
              f"{r['decode_per_s'] / engine[streams]:>13.2f} {r['errors']:>7} {r['ttft_p50']:>8.3f}s")
        if r["first_error"]:
            print(f"  first error: {r['first_error']}")
    if load:
        print(f"load: {load['clients']} concurrent streams x {args.load_tokens} tokens: {load['errors']} errors, "
              f"TTFT p50 {load['ttft_p50']:.3f}s p99 {load['ttft_p99']:.3f}s, {load['tokens_per_s']:.1f} tokens/s")
        if load["first_error"]:
            print(f"  first error: {load['first_error']}")
    print(f"serve/engine decode rate: {served[8]['decode_per_s'] / engine[8]:.2f}")
    return 1 if any(r["errors"] for r in served.values()) or (load and load["errors"]) else 0


if __name__ == "__main__":
    sys.exit(main())
