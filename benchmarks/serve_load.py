"""``autoglm-build serve`` on loopback against its own decoder: decode tokens/s at 1 and 8 streams.

It times the engine alone at 1 and at 8 rows, on the same shapes the server will see (the clients' prompt, then
``--max-tokens - 1`` decode steps), with the backend the server picks: on ONNX Runtime the decoder graph with each
step's ``present_*`` bound as the next ``past_*`` (no embedding, no sampling, no copies to numpy:
:func:`ort_engine_rate`); on TensorRT the embed and decoder engines (every stage of a staged decoder) on the server's
own KV cache on the GPU, with the sampler's logits brought to the host (:func:`trt_engine_rate` says exactly what a
step holds). On TensorRT the engine is timed first and closed before any server starts; on ONNX Runtime it stays
open beside the server and each of its runs is paired with a server run right after it (:func:`paired_runs`: a
shared CPU's speed drifts between runs a minute apart; ``--no-pair`` times it first, as on TensorRT).
``--engine-only`` prints those rates as JSON and stops there.

Then it sends 1, and then 8, concurrent streaming chat requests (sampled with seeds, EOS ignored; httpx
reading the SSE lines, so the client takes little CPU from the server) to one server started with
``--max-batch 8`` and measures its decode rate as the clients see it: tokens after each stream's
first, over the time from the first stream's first token to the last stream's end. Last, a load phase:
``--clients`` concurrent streams of real ``openai`` AsyncOpenAI clients (errors, TTFT p50/p99,
tokens/s). Ends with the line ``serve/engine decode rate: <ratio>`` at batch 8.

``--agent SESSIONSxSTEPS`` replays the phone agent instead (issue 12's contract): each session sends,
step after step, the system prompt, its history (earlier user turns without their screenshot, earlier
replies as ``<think>..</think><answer>..</answer>``) and a new full-size screenshot, all sessions at
once; once against a server with prefix reuse and once against one without
(``$AUTOGLM_BUILD_PREFIX_CACHE_MIB=0``), printing TTFT p50/p99 (all steps, and the steps after each
session's first), the prompt tokens the decoder ran and those it reused, tokens/s and errors.
``--baseline ROW.json`` adds transformers' ``generate`` on the same requests as a third line: the row
``benchmarks/agent_generate.py --json`` wrote (it runs on the Python with torch; this one may not).

Runs on the GPU harness's Python 3.9 (no torch); ``httpx`` and ``openai`` are imported where used, so
agent_generate.py can import the agent's requests from here without them.

    python benchmarks/serve_load.py [-w build/autoglm-phone-tiny] [--max-tokens 128] [--clients 64]
    python benchmarks/serve_load.py --engine-only [-w ...] [--max-tokens 128]
    python benchmarks/serve_load.py --agent 8x5 [--agent-tokens 32] [--baseline generate.json]
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
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np

if TYPE_CHECKING:  # imported where used: agent_generate.py imports this file on a Python without them
    import httpx
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
            url, proc, _ = stack.enter_context(serve_process(serve_args, logs, env, ready_timeout=args.ready_timeout))
        except RuntimeError as exc:  # exited or not ready: the log's tail, no traceback
            raise SystemExit(str(exc)) from None
        start = gpu_memory_mib(proc.pid)
        yield url
        after = gpu_memory_mib(proc.pid)
        if start is not None:
            print(f"server GPU memory (nvidia-smi, MiB): {start} when ready, {after} after the load "
                  f"({', '.join(f'{k}={v}' for k, v in sorted((env or {}).items())) or 'default settings'})")


def gpu_memory_mib(pid: int) -> Optional[int]:
    """GPU memory the process holds on every GPU (nvidia-smi's compute apps), or None without a GPU."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [int(mib) for line in out.splitlines() if "," in line
            for p, mib in [line.split(",")[:2]] if p.strip() == str(pid) and mib.strip().isdigit()]
    return sum(used) if used else None


# ---- the engine alone --------------------------------------------------------------------------


def prompt_ids(args) -> Tuple[list, object]:
    """The ids of the clients' prompt (as the server builds it) and the server's chat tokenizer."""
    from autoglm_build.calibration import tokenizer_for
    from autoglm_build.config import load_config
    from autoglm_build.runtime.text import ChatTokenizer, Segment

    cfg = load_config(Path(args.config))
    tok = ChatTokenizer(tokenizer_for(cfg)[0], cfg.text.vocab_size)
    return tok.chat_prompt([("user", [Segment(text=MESSAGE.format(0))])], False).ids, tok


def engine_rate(backend, cfg, tokenizer, batch: int, ids: list, steps: int, select: bool = False) -> dict:
    """The decoder alone at ``batch``: :func:`ort_engine_rate` or :func:`trt_engine_rate` by backend."""
    if backend.name == "tensorrt" or len(backend.parts.get("decoder", ["decoder"])) > 1:
        # a staged decoder on ONNX Runtime: its stages chained through the server's own cache (OrtKVCache)
        return trt_engine_rate(backend, cfg, tokenizer, batch, ids, steps, select=select)
    return {"tokens_per_s": ort_engine_rate(backend, cfg, batch, len(ids), steps), "steps": steps, "cache": "bound"}


def ort_engine_rate(backend, cfg, batch: int, prompt: int, steps: int) -> float:
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


def copies(cache) -> dict:
    """The device cache's count of its copies by kind (summed over its GPUs where it has several); empty for
    a host cache."""
    total = getattr(cache, "traffic", None)
    if total is None and getattr(cache, "device", None) is not None:
        total = cache.device.traffic
    return dict(total or {})


def prompt_chunks(ids: list, rows: int, chunk: int) -> list:
    """``rows`` copies of the prompt ``ids`` as the scheduler's prefill chunks (text positions)."""
    from autoglm_build.runtime.kv_cache import Chunk

    prompt = np.broadcast_to(np.asarray(ids, np.int64), (rows, len(ids)))
    positions = np.broadcast_to(np.arange(len(ids), dtype=np.int64), (rows, 3, len(ids)))
    return [Chunk(np.ascontiguousarray(prompt[:, s:s + chunk]), np.ones((rows, min(s + chunk, len(ids))), np.int64),
                  np.ascontiguousarray(positions[:, :, s:s + chunk])) for s in range(0, len(ids), chunk)]


def trt_engine_rate(backend, cfg, tokenizer, batch: int, ids: list, steps: int, select: bool = False) -> dict:
    """Decode tokens/s of the TensorRT engines alone, through the server's own device cache
    (:class:`~autoglm_build.runtime.device_cache.DeviceKVCache`, the one ``backend.kv_cache`` gives the
    scheduler, at the scheduler's context): ``batch`` rows of the prompt ``ids`` prefilled (the prefill
    profile, in the scheduler's chunks and groups of rows), then ``steps`` decode steps with fixed ids at the
    next positions.

    A step is what the cache does for the scheduler, nothing else: the ids, positions and changed mask
    elements up, the ``embed`` engine, each decoder stage's engine (every stage of a staged decoder, the
    activations handed over on the device), each row's new keys/values copied device to device into its
    slot, and the logits of the sampler's candidate ids (``cache.logit_columns``, as the scheduler sets
    them) down to the host, waited for. Not in it: sampling, detokenizing, the scheduler, HTTP. The KV
    cache never crosses to the host; the re-lays at a growing capacity (device to device, every ~1/8 of
    the length) happen as in the server. The whole run is made twice on one cache and the second timed,
    so the contexts are bound and the scratch buffers allocated at their largest shapes, as in a warm
    server. Where the engines cannot keep the cache on the device (``device_cache_problem``) the backend
    gives the host cache, as it gives the server; ``cache`` in the result says which.

    ``select``: the step as the server's GPU runs it instead (``--engine-select``): the engines as one CUDA graph
    where ``serve.cuda_graphs`` is on, then the select engine (``serve.select_k``; every row greedy) choosing
    the tokens, only their ids down. What a server step costs the GPU, with no host work between steps but the
    launch: the server's rate beside it says how much of the gap to the engine's is the host's. None where the
    cache cannot select (the host samples in the server too).

    Returns:
        ``tokens_per_s`` (``batch x steps`` over the timed loop), ``steps``, ``seconds``, ``cache`` (the
        cache's class), ``rebinds`` (contexts bound during the timed loop: the embed engine's one context,
        which the prefill used last, at the first step), ``traffic`` (bytes and calls per copy kind during
        the timed loop: the cache's own count, :class:`~autoglm_build.runtime.device.Device`),
        ``logits_bytes`` (per step, what must come back), ``cache_bytes`` (the keys and values the last
        step read), ``capacity`` (its columns per row), ``units`` (the decoder's engines) and
        ``prefill_rows`` (rows per prefill call).
    """
    from autoglm_build.runtime.generation import Sampler
    from autoglm_build.runtime.kv_cache import CacheSpec

    t = cfg.text
    context = min(cfg.engine.context, backend.context or cfg.engine.context)  # as the scheduler caps it
    chunk = min(cfg.engine.prefill_tokens, backend.prefill_chunk or cfg.engine.prefill_tokens)
    rows = min(getattr(cfg.engine, "prefill_rows", batch), batch, getattr(backend, "prefill_batch", None) or batch)
    cache = backend.kv_cache(CacheSpec.of(t), batch, context)
    candidates = Sampler(tokenizer, batch).ids
    cache.logit_columns = (int(candidates[0]), int(candidates[-1]) + 1)
    if select:
        if not hasattr(cache, "use_select"):  # a host cache: the server's host samples too
            return None
        cache.use_graphs(cfg.serve.cuda_graphs)
        if not cache.use_select(tokenizer.ids["</think>"], cfg.serve.select_k):
            cache.close()
            return None
    step_ids = np.full((batch, 1), ids[-1], np.int64)
    step_positions = [np.full((batch, 3, 1), len(ids) + k, np.int64) for k in range(steps)]
    try:
        for _ in range(2):  # the first run warms up: contexts bound, scratch buffers at their largest
            for slot in range(batch):
                if cache.used[slot]:
                    cache.release(slot)
            for first in range(0, batch, rows):  # in the scheduler's groups: the prefill profile's rows at most
                group = list(range(first, min(first + rows, batch)))
                cache.prefill(group, [len(ids)] * len(group), prompt_chunks(ids, len(group), chunk))
            traffic = copies(cache)
            rebinds = getattr(backend, "rebinds", 0)
            start = time.perf_counter()
            for k in range(steps):
                cache.decode(step_ids, step_positions[k])
            seconds = time.perf_counter() - start
        moved = {k: v - traffic[k] for k, v in copies(cache).items()}
        lo, hi = cache.logit_columns
        item = np.dtype(getattr(cache, "logits_dtype", np.float32)).itemsize
        return {"tokens_per_s": batch * steps / seconds, "steps": steps, "seconds": seconds,
                "cache": type(cache).__name__, "rebinds": getattr(backend, "rebinds", 0) - rebinds,
                "traffic": moved, "logits_bytes": batch * (hi - lo) * item,
                "cache_bytes": cache.top * cache.block_bytes(cache.capacity), "capacity": cache.capacity,
                "units": list(backend.parts.get("decoder", ["decoder"])), "prefill_rows": rows}
    finally:
        if hasattr(cache, "close"):
            cache.close()


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


async def light_client(url: str, i: int, max_tokens: int, timeout: float) -> dict:
    """The same request as :func:`one_client` over a bare asyncio connection, its SSE lines only scanned: on a
    2-core machine the load generator's own CPU is taken from the server being measured (the openai SDK's
    per-chunk parsing, or httpx's streaming: as much CPU as the server's per token), so the decode phases'
    client does the least per chunk that still sees each one as it arrives. HTTP/1.1 with a chunked body,
    as uvicorn streams."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    body = json.dumps({"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": MESSAGE.format(i)}],
                       "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True}).encode()
    start = time.perf_counter()
    first, tokens = None, 0
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (host.encode(), len(body), body))
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"stream {i}: {status.decode().strip()}")
        while (await reader.readline()).strip():  # the headers
            pass
        pending = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)  # a chunk of the chunked body
            if not size:
                break
            pending += (await reader.readexactly(size + 2))[:-2]  # the chunk's data, without its CRLF
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if first is None and b'"content": "' in line and b'"content": ""' not in line:
                    first = time.perf_counter()
                if b'"completion_tokens"' in line:
                    tokens = json.loads(line[len(b"data: "):])["usage"]["completion_tokens"]
    finally:
        writer.close()
    end = time.perf_counter()
    return {"start": start, "first": first if first is not None else end, "end": end, "tokens": tokens}


async def phase(url: str, clients: int, max_tokens: int, timeout: float, light: bool = True) -> dict:
    import httpx
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=timeout)
    start = time.perf_counter()
    calls = (light_client(url, i, max_tokens, timeout) if light else one_client(client, i, max_tokens, timeout)
             for i in range(clients))
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=timeout)
    wall = time.perf_counter() - start
    await client.close()
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
            "decode_steps": stats["decode_steps"], "overlapped_steps": stats.get("overlapped_steps", 0),
            "device_select": stats.get("device_select"), "cuda_graphs": stats.get("cuda_graphs"),
            "max_batch": stats["max_batch"], "context": stats["context"], "kv_dtype": stats["kv_dtype"],
            "kv_bytes_per_token": stats["kv_bytes_per_token"]}


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


def agent_body(messages: list, max_tokens: int) -> dict:
    """One step's request: the client's sampling, streamed, special tokens shown and EOS ignored (so every
    step's first token and its length are the same work whatever the model writes)."""
    return {"model": "autoglm-phone-9b", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "top_p": 0.85, "frequency_penalty": 0.2, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True, "skip_special_tokens": False}


def agent_turn(k: int, screen: str) -> dict:
    """Step ``k``'s user turn: the screenshot, then the task (first step) or the screen marker."""
    task = "打开设置, 开启蓝牙并返回桌面" if k == 0 else "** Screen Info **"
    text = f"{task}\n\n{{\"current_app\": \"System Settings\"}}"
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": screen}},
                                        {"type": "text", "text": text}]}


def agent_reply(messages: list, content: str) -> None:
    """After a step, what the client sends back next time: its last user turn without the screenshot, and
    the reply as ``<think>..</think><answer>..</answer>``."""
    messages[-1]["content"] = messages[-1]["content"][1:]
    messages.append({"role": "assistant", "content": f"<think>{content}</think><answer>{ACTION}</answer>"})


async def agent_step(http: httpx.AsyncClient, messages: list, max_tokens: int) -> dict:
    """One streamed step (:func:`agent_body`); TTFT at the first chunk with text."""
    start, first, content, usage = time.perf_counter(), None, "", {}
    async with http.stream("POST", "/v1/chat/completions", json=agent_body(messages, max_tokens)) as resp:
        if resp.status_code != 200:  # the server's one-line reason (a prompt over the context, ...), not only the code
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}")
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
        messages.append(agent_turn(k, screen))
        result = await agent_step(http, messages, max_tokens)
        results.append({**result, "step": k})
        agent_reply(messages, result["content"])
    return results


async def agent_phase(url: str, screens: list, max_tokens: int, timeout: float) -> dict:
    """Every session at once; TTFT over all steps and over the steps after the first."""
    import httpx

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


BASELINE_KEYS = ("sessions", "steps_per_session", "agent_tokens", "steps", "errors", "ttft_p50", "ttft_p99",
                 "later_p50", "later_p99", "prompt_tokens", "prefilled", "reused", "tokens_per_s", "label")


def load_baseline(path: str, sessions: int, steps: int, tokens: int) -> dict:
    """``benchmarks/agent_generate.py``'s JSON row, refused unless it replayed the same load."""
    try:
        row = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--baseline {path}: cannot read it ({exc})") from None
    missing = [k for k in BASELINE_KEYS if k not in row]
    if missing:
        raise SystemExit(f"--baseline {path}: not an agent_generate.py row (no {', '.join(missing)})")
    if (row["sessions"], row["steps_per_session"], row["agent_tokens"]) != (sessions, steps, tokens):
        raise SystemExit(f"--baseline {path}: it replayed {row['sessions']}x{row['steps_per_session']} with "
                         f"{row['agent_tokens']} new tokens per step; this run is {sessions}x{steps} with {tokens}")
    return row


def agent_main(args, cfg) -> int:
    sessions, steps = (int(x) for x in args.agent.lower().split("x"))
    baseline = load_baseline(args.baseline, sessions, steps, args.agent_tokens) if args.baseline else None
    screens = agent_screens(sessions, steps)
    results = {}
    modes = (("on", {}), ("off", {"AUTOGLM_BUILD_PREFIX_CACHE_MIB": "0"}))
    for mode, env in [(m, e) for m, e in modes if args.agent_reuse in ("both", m)]:
        with server(args, 8, env) as url:
            asyncio.run(phase(url, 1, 4, args.timeout))  # warm-up (no system prompt: nothing reused from it)
            results[mode] = asyncio.run(agent_phase(url, screens, args.agent_tokens, args.timeout))
    print(f"phone agent, {cfg.name}, {args.backend}: {sessions} concurrent sessions x {steps} steps, one "
          f"1080x2400 screenshot per step, {args.agent_tokens} new tokens per step, server --max-batch 8")
    return agent_table(results, baseline)


def agent_table(results: dict, baseline: Optional[dict] = None) -> int:
    """The served rows (``on``, ``off``: prefix reuse; one of them alone with ``--agent-reuse``) and
    transformers' ``generate`` row where given, and each step's reply; the exit status (1 when a served run
    had errors or, with both, its replies differ with and without reuse)."""
    on, off = results.get("on"), results.get("off")
    rows = {**results, **({"generate": baseline} if baseline else {})}
    print(f"{'prefix reuse':>12} {'TTFT p50':>9} {'TTFT p99':>9} {'steps>1 p50':>12} {'steps>1 p99':>12} "
          f"{'prompt tok':>11} {'prefilled':>10} {'reused':>8} {'tok/s':>7} {'errors':>7}")
    for mode, r in rows.items():
        print(f"{mode:>12} {r['ttft_p50']:>8.3f}s {r['ttft_p99']:>8.3f}s {r['later_p50']:>11.3f}s "
              f"{r['later_p99']:>11.3f}s {r['prompt_tokens']:>11} {r['prefilled']:>10} {r['reused']:>8} "
              f"{r['tokens_per_s']:>7.1f} {r['errors']:>7}")
        if r.get("first_error"):
            print(f"  first error: {r['first_error']}")
    if baseline:
        print(f"generate: {baseline['label']}")
    first = on or off
    for k, session in enumerate(first["contents"][:2]):  # what the agent's client would parse
        for step, content in enumerate(session or []):
            print(f"reply, session {k} step {step}: {content[:160]!r}")
    same = True
    if on and off:
        same = on["contents"] == off["contents"]
        print(f"replies equal with and without reuse: {'yes' if same else 'NO'}")
        print(f"TTFT p50 without/with reuse: {off['ttft_p50'] / on['ttft_p50']:.2f}x")
    if baseline and on:
        print(f"TTFT p50 generate/served with reuse: {baseline['ttft_p50'] / on['ttft_p50']:.2f}x; "
              f"tokens/s served with reuse/generate: {on['tokens_per_s'] / baseline['tokens_per_s']:.2f}x")
    return 1 if any(r["errors"] for r in results.values()) or not same else 0


ENGINE_ALONE = {"tensorrt": "embed and decoder engines on the server's KV cache ({cache}), the sampler's logits "
                            "to the host, no sampling",
                "onnxruntime": "decoder graph alone (IOBinding), no embed, no sampling",
                "staged": "embed and the decoder's stages chained on the server's KV cache ({cache}), no sampling"}


def capacity_line(cfg, stats: dict) -> str:
    """The largest batch x context the server's engines hold (its ``/ready``: the decode profile's rows and the context,
    as the engines cap them) and the keys/values that take in the server's cache, at its own dtype (``/ready``'s
    ``kv_dtype``: FP16 on TensorRT, where the device cache holds them from the server's start; ONNX Runtime's host
    cache, at its graph's dtype, grows to them)."""
    rows, context = stats["max_batch"], stats["context"]
    per_token = stats["kv_bytes_per_token"]
    mib = rows * context * per_token / 2**20
    kind = {"float16": "FP16", "float32": "FP32", "bfloat16": "BF16"}.get(stats["kv_dtype"], stats["kv_dtype"])
    return (f"largest batch x context the engines hold: {rows} x {context:,} tokens = {mib:,.0f} MiB of {kind} "
            f"keys/values ({per_token / 1024:g} KiB a token)")


def median_run(runs: list, key: str = "tokens_per_s") -> Optional[dict]:
    """The run whose ``key`` is the median of ``runs`` (the lower middle of an even count), with every run's
    ``key`` beside it as ``runs``; None where the runs are (a cache that cannot select)."""
    done = [r for r in runs if r is not None]
    if not done:
        return None
    ordered = sorted(done, key=lambda r: (np.isnan(r[key]), r[key]))  # a run with no rate (every stream failed) last
    return {**ordered[(len(ordered) - 1) // 2], "runs": [r[key] for r in done]}


def spread(run: dict) -> str:
    """``min-max`` of a median run's ``runs`` (empty for one run)."""
    runs = run.get("runs") or []
    return f"{min(runs):,.0f}-{max(runs):,.0f}" if len(runs) > 1 else ""


def server_cores(args, cfg, backend: str):
    """Where the server runs its scheduler and its event loop (:func:`~autoglm_build.serve.server.cpu_split`, from this
    process's cores, as the server it starts will see them): None where they are not split (TensorRT, one core,
    ``serve.cpu_affinity`` off) or the load generator stays where the OS puts it (``--no-pin-client``)."""
    from autoglm_build.serve.server import cpu_split

    return cpu_split(cfg, backend) if args.pin_client else None


def pin_load_generator(split) -> str:
    """On the CPU backend, the load generator (this process's main thread, where its clients run) onto the core the
    server keeps for HTTP (``split[1]``, :func:`server_cores`), so the clients take no time from the scheduler's core:
    on a 2-core machine they otherwise share it with the graphs being measured, as clients on other machines never
    would. Called after the server started (it inherits nothing); a paired engine run moves this thread to the
    scheduler's cores and back (:func:`paired_runs`). Returns the core ('' where not pinned: ``split`` None)."""
    import os

    if split is None:
        return ""
    os.sched_setaffinity(0, split[1])
    return ",".join(str(c) for c in sorted(split[1]))


def open_engine(args, cfg):
    """The backend the engine-alone rates run on: the server's own (``--backend``), ONNX Runtime with the server's
    threads (``serve.cpu_threads``), its pool on the server's scheduler cores (``serve.cpu_affinity``), so it is the
    engine the server runs."""
    from autoglm_build.runtime.backends import open_backend
    from autoglm_build.serve.server import cpu_split, cpu_threads

    planned = cpu_split(cfg, "onnxruntime")
    return open_backend(Path(args.workdir), ["embed", "decoder"], args.backend, threads=cpu_threads(cfg),
                        cores=planned[0] if planned else None)


def engine_alone(args, cfg, backend, rates: Optional[dict] = None) -> dict:
    """The engine-alone decode rates at 1 and 8 rows (``rates``: already measured, as the paired runs do) and what
    they ran on."""
    ids, tokenizer = prompt_ids(args)
    if rates is None:
        rates = {streams: median_run([engine_rate(backend, cfg, tokenizer, streams, ids, args.max_tokens - 1)
                                      for _ in range(args.repeat)]) for streams in (1, 8)}
    selected = {streams: median_run([engine_rate(backend, cfg, tokenizer, streams, ids, args.max_tokens - 1,
                                                 select=True) for _ in range(args.repeat)])
                for streams in (1, 8)} if args.engine_select and backend.name == "tensorrt" else {}
    d = backend.describe()
    staged = d["backend"] == "onnxruntime" and rates[8].get("cache") != "bound"
    what = (ENGINE_ALONE["staged"] if staged else ENGINE_ALONE[d["backend"]]).format(cache=rates[8]["cache"])
    return {"backend": d["backend"], "precision": d["precision"], "prompt": len(ids), "what": what,
            "rates": rates, "select_rates": {k: v for k, v in selected.items() if v is not None}}


def served_summary(runs: list) -> dict:
    """One stream count's server runs: the median run, every run's errors, the first error and the last run."""
    return {**median_run(runs, "decode_per_s"), "errors": sum(r["errors"] for r in runs),
            "first_error": next((r["first_error"] for r in runs if r["first_error"]), ""), "last": runs[-1]}


def paired_runs(args, cfg, backend, url: str, split) -> Tuple[dict, dict, dict]:
    """On a host backend (ONNX Runtime), each engine-alone run right before a server run at the same stream count,
    ``--repeat`` pairs per count, the engine on the scheduler's cores and the load generator on the HTTP core
    (``split``; None: where the OS puts them). The machine's speed drifts (a shared 2-core VM moved by a fifth
    within a minute in the thirteenth session's runs), and the two halves of a pair see the same drift where an
    engine timed before the server starts and a server timed after do not.

    Returns:
        (the engine's rates per stream count as :func:`engine_alone` takes them, each run with the ``cores`` it ran
        on; the server's per count as :func:`served_summary` gives them; each pair's server over engine per count,
        a pair whose server run has no rate left out)."""
    import os

    ids, tokenizer = prompt_ids(args)

    def pin(cores) -> None:
        if split is not None:
            os.sched_setaffinity(0, cores)

    engine, served, ratios = {}, {}, {}
    for streams in (1, 8):
        pairs = []
        for _ in range(args.repeat):
            pin(split[0] if split else None)
            cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))  # where this engine run runs
            alone = {**engine_rate(backend, cfg, tokenizer, streams, ids, args.max_tokens - 1), "cores": cores}
            pin(split[1] if split else None)
            pairs.append((alone, asyncio.run(phase(url, streams, args.max_tokens, args.timeout))))
        engine[streams] = median_run([alone for alone, _ in pairs])
        served[streams] = served_summary([run for _, run in pairs])
        # a run whose streams all failed has no rate (nan): the median and the range are the other pairs'
        ratios[streams] = [run["decode_per_s"] / alone["tokens_per_s"] for alone, run in pairs
                           if not np.isnan(run["decode_per_s"])]
    return engine, served, ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=str(ROOT / "configs" / "autoglm-phone-tiny.yaml"))
    parser.add_argument("-w", "--workdir", default=str(ROOT / "build" / "autoglm-phone-tiny"))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per stream in the 1 and 8 stream phases")
    parser.add_argument("--clients", type=int, default=64, help="streams of the load phase (0: none)")
    parser.add_argument("--load-tokens", type=int, default=64, help="tokens per stream in the load phase")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per phase before giving up")
    parser.add_argument("--repeat", type=int, default=5,
                        help="runs of each decode phase and of each engine-alone rate; the medians are compared, on "
                        "the CPU the median of the pairs' ratios (a 128-token phase lasts a fraction of a second at "
                        "the tiny config: one run swings by a third)")
    parser.add_argument("--engine-only", action="store_true",
                        help="time the engine alone at 1 and 8 rows, print it as JSON and start no server")
    parser.add_argument("--engine-select", action="store_true",
                        help="TensorRT: also time the engine as the server's GPU runs a step (CUDA graph, then the "
                        "select engine, ids down) and print it beside the server's rate")
    parser.add_argument("--agent", help="SESSIONSxSTEPS: replay the phone agent with and without prefix reuse "
                        "(instead of the decode phases)")
    parser.add_argument("--agent-tokens", type=int, default=32, help="new tokens per agent step")
    parser.add_argument("--agent-reuse", choices=["both", "on", "off"], default="both",
                        help="with --agent: the servers to start, with prefix reuse, without, or both (a large "
                        "build starts in minutes: one server saves that)")
    parser.add_argument("--no-pin-client", dest="pin_client", action="store_false",
                        help="ONNX Runtime: leave the load generator and the paired engine runs' thread where the OS "
                        "puts them (default: the load generator on the server's HTTP core, serve.cpu_affinity's, and "
                        "each engine run on the scheduler's; the engine's intra-op pool, on a machine with one, stays "
                        "on the scheduler's cores either way, as the server's)")
    parser.add_argument("--no-pair", dest="paired", action="store_false",
                        help="ONNX Runtime: time the engine alone first and close it before the server starts, as on "
                        "TensorRT (default: each engine run right before a server run, the engine kept open beside "
                        "the server)")
    parser.add_argument("--ready-timeout", type=float, default=120.0,
                        help="seconds a server may take to load its engines and answer /ready")
    parser.add_argument("--baseline", help="with --agent: the JSON row benchmarks/agent_generate.py wrote for the "
                        "same load (transformers' generate), printed as a third line of the table")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: at least 1 run of each rate")

    from autoglm_build.config import load_config

    cfg = load_config(Path(args.config))
    if args.agent:
        return agent_main(args, cfg)
    if args.baseline:
        parser.error("--baseline goes with --agent")
    backend = open_engine(args, cfg)
    # ONNX Runtime on the CPU stays open beside the server and is timed in pairs with it; TensorRT (or ONNX Runtime's
    # CUDA provider) is timed first and closed before the server starts (the GPU holds one copy of the engines at once)
    on_cpu = backend.name == "onnxruntime" and "CUDAExecutionProvider" not in getattr(backend, "providers", ())
    paired = args.paired and on_cpu and not args.engine_only
    try:
        engine = None if paired else engine_alone(args, cfg, backend)
    finally:
        if not paired:
            backend.close()
    if args.engine_only:
        print(json.dumps(engine))
        return 0
    served, ratios = {}, {}
    try:
        # the server's cores, read before this thread is pinned to one of them
        split = server_cores(args, cfg, backend.name)
        with server(args, 8) as url:
            client_cores = pin_load_generator(split)
            asyncio.run(phase(url, 1, 4, args.timeout))  # warm-up
            if paired:
                rates, served, ratios = paired_runs(args, cfg, backend, url, split)
                engine = engine_alone(args, cfg, backend, rates)
            else:
                for streams in (1, 8):
                    served[streams] = served_summary([asyncio.run(phase(url, streams, args.max_tokens, args.timeout))
                                                      for _ in range(args.repeat)])
            load = asyncio.run(phase(url, args.clients, args.load_tokens, args.timeout, light=False)) \
                if args.clients else None
    finally:
        if paired:
            backend.close()
    rates = {streams: r["tokens_per_s"] for streams, r in engine["rates"].items()}
    # the ratio: the median of the pairs' ratios where they were paired, else the medians' ratio
    ratio = {streams: (float(np.median(ratios[streams])) if ratios[streams] else float("nan")) if paired
             else r["decode_per_s"] / rates[streams] for streams, r in served.items()}

    print(f"decode, {cfg.name}, {engine['backend']} {engine['precision']}, prompt {engine['prompt']} tokens, "
          f"{args.max_tokens} new tokens per stream, server --max-batch 8 on loopback")
    print(f"engine alone: {engine['what']}")
    if paired:
        where = engine["rates"][8].get("cores")
        print(f"{args.repeat} pairs per stream count, each an engine-alone run (on CPU {where}) then a server run back "
              "to back; each rate the median of its runs, serve/engine the median of the pairs' ratios (their ranges "
              "in the last columns)")
    elif args.repeat > 1:
        print(f"each rate the median of {args.repeat} runs (server and engine alike; their ranges in the last columns)")
    print(f"{'streams':>7} {'server tok/s':>13} {'engine tok/s':>13} {'serve/engine':>13} {'errors':>7} "
          f"{'TTFT p50':>9} {'server range':>15} {'engine range':>15}" + (f" {'ratio range':>12}" if paired else ""))
    for streams, r in served.items():
        print(f"{streams:>7} {r['decode_per_s']:>13.1f} {rates[streams]:>13.1f} "
              f"{ratio[streams]:>13.2f} {r['errors']:>7} {r['ttft_p50']:>8.3f}s "
              f"{spread(r):>15} {spread(engine['rates'][streams]):>15}"
              + (f" {min(ratios[streams]):>5.2f}-{max(ratios[streams]):.2f}" if paired and ratios[streams] else ""))
        if r["first_error"]:
            print(f"  first error: {r['first_error']}")
    chosen = engine.get("select_rates") or {}
    if chosen:
        print("engine + select (the server's GPU step: " + ("CUDA graph, " if cfg.serve.cuda_graphs else "")
              + "tokens chosen on the GPU, ids down; no host work between steps): "
              + ", ".join(f"{r['tokens_per_s']:.1f} tok/s at {k} "
                          f"(server/that {served[k]['decode_per_s'] / r['tokens_per_s']:.2f})"
                          for k, r in sorted(chosen.items())))
    if load:
        print(f"load: {load['clients']} concurrent streams x {args.load_tokens} tokens: {load['errors']} errors, "
              f"TTFT p50 {load['ttft_p50']:.3f}s p99 {load['ttft_p99']:.3f}s, {load['tokens_per_s']:.1f} tokens/s")
        if load["first_error"]:
            print(f"  first error: {load['first_error']}")
    last = served[8]["last"]  # the server's counters since it started, to the 8 streams' end
    graphs = last["cuda_graphs"]
    ran = bool(graphs) and not graphs.get("off") and graphs.get("launches", 0) > 0
    print(f"server: tokens chosen on the {'GPU' if last['device_select'] else 'host'}, CUDA graphs "
          f"{'launched ' + str(graphs['launches']) + ' times' if ran else 'off'}, {last['overlapped_steps']} of "
          f"{last['decode_steps']} decode steps launched ahead")
    print(capacity_line(cfg, last))
    where = f"on CPU {client_cores}, the server's HTTP core" if client_cores else "where the OS puts it"
    print(f"load generator: {where}")
    print(f"serve/engine decode rate: {ratio[8]:.2f}")
    return 1 if any(r["errors"] for r in served.values()) or (load and load["errors"]) else 0


if __name__ == "__main__":
    sys.exit(main())
