"""Prefix reuse (issue 14) over the tiny build's ONNX graphs: a request that starts with held prefix blocks
prefills only the rest and generates, token for token, what a full prefill generates."""

from __future__ import annotations

import io
from typing import List

import numpy as np
from PIL import Image

from autoglm_build.calibration import tokenizer_for
from autoglm_build.runtime.generation import Request, SamplingParams, Scheduler
from autoglm_build.runtime.media import encode_image
from autoglm_build.runtime.prefix_cache import block_keys
from autoglm_build.runtime.text import ChatTokenizer, Prompt, Segment
from tests.conftest import ROOT
from tests.serve.test_agent import system_prompt

SCREENS = ROOT / "calibration_data" / "images"



class Counting:
    """The backend, counting the positions the decoder's prefill calls run (padding included)."""

    def __init__(self, inner) -> None:
        self.inner, self.positions = inner, 0
        self.max_batch, self.context, self.prefill_chunk = inner.max_batch, inner.context, inner.prefill_chunk

    def run(self, module, feed, phase="prefill"):
        if module == "decoder" and phase == "prefill":
            self.positions += feed["inputs_embeds"].shape[0] * feed["inputs_embeds"].shape[1]
        return self.inner.run(module, feed, phase)


def scheduler(runtime, budget=None, block=256, max_batch=4) -> Scheduler:
    """A scheduler over a counting backend (``budget`` None: the config's prefix cache; 0: none)."""
    cfg, backend, tok = runtime
    return Scheduler(Counting(backend), cfg, tok, max_batch=max_batch, queue_size=16, context=cfg.engine.context,
                     prefix_cache_bytes=budget, prefix_block=block)


def generate(sched: Scheduler, prompts: List[Prompt], max_tokens: int = 10) -> List[List[int]]:
    """Greedy token ids of ``prompts`` submitted together (the phone agent's sampling)."""
    reqs = [Request(p, SamplingParams(temperature=0, top_p=0.85, frequency_penalty=0.2, max_tokens=max_tokens,
                                      ignore_eos=True), emit=lambda e: None) for p in prompts]
    for req in reqs:
        sched.submit(req)
    sched.run_until_idle()
    assert all(len(r.token_ids) == max_tokens for r in reqs)
    return [r.token_ids for r in reqs]


def alone(runtime, prompt: Prompt, max_tokens: int = 10) -> List[int]:
    """What a full prefill generates: a scheduler without prefix reuse."""
    return generate(scheduler(runtime, budget=0), [prompt], max_tokens)[0]


def png(name: str, mark: bool = False) -> bytes:
    """A screenshot's PNG bytes; ``mark``: with a black square drawn in (same size, other pixels)."""
    img = Image.open(SCREENS / name).convert("RGB")
    if mark:
        img.paste((0, 0, 0), (100, 300, 500, 700))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def agent_prompt(runtime, history, screenshot: bytes, task: str) -> Prompt:
    """The phone agent's request: system prompt, earlier turns (their screenshots dropped), the newest
    user turn with its screenshot first."""
    cfg, backend, tok = runtime
    turns = [("system", [Segment(text=system_prompt())])]
    for text, reply in history:
        turns += [("user", [Segment(text=text)]), ("assistant", [Segment(text=reply)])]
    image = encode_image(backend, cfg, screenshot, "image")
    turns.append(("user", [image, Segment(text=f"{task}\n\n{{\"current_app\": \"System Settings\"}}")]))
    return tok.chat_prompt(turns, False)


def shared(a: Prompt, b: Prompt) -> int:
    """Leading tokens of equal id and equal 3-D position."""
    n = min(len(a.ids), len(b.ids))
    same = (np.asarray(a.ids[:n]) == np.asarray(b.ids[:n])) & (a.positions[:, :n] == b.positions[:, :n]).all(0)
    return int(np.argmin(same)) if not same.all() else n


def test_an_agent_step_prefills_only_its_new_tokens_and_generates_what_a_full_prefill_does(runtime):
    tok = runtime[2]
    sched = scheduler(runtime)  # the config's prefix cache, blocks of 256
    first = agent_prompt(runtime, [], png("screen_settings.png"), "打开蓝牙")
    out_first = generate(sched, [first])[0]
    assert sched.prefix.stats()["misses"] == 1 and sched.backend.positions == len(first.ids)

    reply = f"<think>{tok.decode(out_first)}</think><answer>do(action=\"Tap\", element=[500, 300])</answer>"
    second = agent_prompt(runtime, [("打开蓝牙\n\n{\"current_app\": \"System Settings\"}", reply)],
                          png("screen_chat.png"), "** Screen Info **")
    common = shared(first, second)
    assert 4096 <= common <= first.splices[0][0]  # the system prompt and the turn's opening, not the image
    before = sched.backend.positions
    out_second = generate(sched, [second])[0]
    stats = sched.prefix.stats()
    reused = common // 256 * 256
    assert stats["hits"] == 1 and stats["tokens_reused"] == reused
    assert sched.backend.positions - before == len(second.ids) - reused  # only the new tokens ran
    assert sched.stats()["prefill_tokens"] == len(first.ids) + len(second.ids) - reused
    assert out_second == alone(runtime, second)
    assert out_first == alone(runtime, first)


def test_a_different_screenshot_at_the_same_positions_is_a_miss(runtime):
    cfg, backend, tok = runtime
    text = "在设置中打开蓝牙, 然后返回桌面并打开微信。" * 8

    def prompt(screenshot: bytes) -> Prompt:
        image = encode_image(backend, cfg, screenshot, "image")
        return tok.chat_prompt([("user", [image, Segment(text=text)])], False)

    a, b = prompt(png("screen_settings.png")), prompt(png("screen_settings.png", mark=True))
    assert a.ids == b.ids and (a.positions == b.positions).all()  # same tokens, same positions
    assert a.splices[0][0] < 64 and len(a.ids) > 4 * 64  # the image is in the first block
    sched = scheduler(runtime, block=64)
    out_a = generate(sched, [a])[0]
    out_b = generate(sched, [b])[0]
    stats = sched.prefix.stats()
    assert (stats["hits"], stats["misses"], stats["tokens_reused"]) == (0, 2, 0)
    assert out_b == alone(runtime, b)
    again = generate(sched, [prompt(png("screen_settings.png"))])[0]  # the first screenshot's bytes again: a hit
    assert sched.prefix.stats()["hits"] == 1 and again == out_a


def test_a_prefix_ending_inside_a_screenshot_splices_the_rest_of_it(runtime):
    """Same screenshot, other text after it: the held blocks end inside the image's tokens, so the new
    part starts with the image's remaining embeddings (the splice's offset into the image)."""
    cfg, backend, tok = runtime
    image = encode_image(backend, cfg, png("screen_settings.png"), "image")
    a, b = (tok.chat_prompt([("user", [image, Segment(text=text * 6)])], False)
            for text in ("打开蓝牙并返回桌面。", "Open the settings app and turn on dark mode. "))
    start, count = a.splices[0][0], len(a.splices[0][1])
    sched = scheduler(runtime, block=64)
    generate(sched, [a])
    out_b = generate(sched, [b])[0]
    reused = sched.prefix.stats()["tokens_reused"]
    assert start < reused < start + count  # the boundary falls inside the image
    assert out_b == alone(runtime, b)


def test_block_keys_name_the_media_and_the_positions():
    """Same ids: another image (by key or, without one, by embeddings) or another grid (other 3-D
    positions for the same 16 tokens) changes the key of the block holding it and of every later one."""
    from autoglm_build.config import load_config

    cfg = load_config(ROOT / "configs" / "autoglm-phone-tiny.yaml")
    tok = ChatTokenizer(tokenizer_for(cfg)[0], cfg.text.vocab_size)
    zeros, ones = np.zeros((16, 8), np.float32), np.ones((16, 8), np.float32)

    def keys(embeds=zeros, grid=(4, 4), key=None) -> List[bytes]:
        parts = [Segment(text="a" * 40), Segment(media="image", embeds=embeds, grid=grid, key=key),
                 Segment(text="b" * 60)]
        return block_keys(tok.build(parts), 16)

    base = keys()
    assert len(base) >= 4 and base == keys()
    first = (len(tok.encode("a" * 40)) + 1) // 16  # the block the image's first token is in
    for other in (keys(embeds=ones), keys(grid=(2, 8)), keys(key=b"another screenshot")):
        assert other[:first] == base[:first]
        assert all(x != y for x, y in zip(other[first:], base[first:]))


def test_eviction_under_a_small_budget_takes_the_least_recent_chain_end_first(runtime):
    tok = runtime[2]
    a = tok.chat_prompt([("user", [Segment(text="Open the settings app and turn on dark mode. " * 14)])], False)
    b = tok.chat_prompt([("user", [Segment(text="在小红书上搜索成都旅游攻略, 然后收藏第一篇。" * 10)])], False)
    assert 128 < len(a.ids) < 192 and 128 < len(b.ids) < 192  # two full blocks of 64 each
    sched = scheduler(runtime, block=64)
    block = sched.cache.block_bytes(64)
    sched.prefix.budget = 3 * block
    out_a = generate(sched, [a])[0]
    assert sched.prefix.stats()["blocks"] == 2
    out_b = generate(sched, [b])[0]  # its second block evicts a's second (a's first is more recent)
    stats = sched.prefix.stats()
    assert (stats["blocks"], stats["bytes"], stats["evictions"]) == (3, 3 * block, 1)
    assert generate(sched, [a])[0] == out_a  # a's first block is still held
    stats = sched.prefix.stats()
    assert (stats["hits"], stats["tokens_reused"], stats["evictions"]) == (1, 64, 2)
    assert stats["bytes"] <= sched.prefix.budget
    assert out_b == alone(runtime, b)


def test_a_budget_below_one_block_turns_reuse_off(runtime):
    tok = runtime[2]
    sched = scheduler(runtime, budget=1000, block=64)
    prompt = tok.chat_prompt([("user", [Segment(text="Open the settings app and turn on dark mode. " * 14)])], False)
    generate(sched, [prompt, prompt])
    assert not sched.prefix.enabled
    assert {k: sched.prefix.stats()[k] for k in ("hits", "misses", "blocks", "bytes")} == \
        {"hits": 0, "misses": 0, "blocks": 0, "bytes": 0}


def test_concurrent_requests_with_one_prefix_stay_correct(runtime):
    """Two requests sharing a long prefix: prefilled together cold (both miss, each block stored once),
    then together warm (both read the same blocks), then one warm beside one cold (two prefill groups);
    each generates what it generates alone without reuse."""
    tok = runtime[2]

    def prompt(task: str) -> Prompt:
        return tok.chat_prompt([("system", [Segment(text=system_prompt()[:1500])]),
                                ("user", [Segment(text=task)])], False)

    tasks = ["打开蓝牙", "Open the settings app and turn on dark mode", "在小红书上搜索成都旅游攻略",
             "Book a table for two at 7pm", "你是谁?", "打开微信并给妈妈发消息"]
    prompts = [prompt(t) for t in tasks]
    want = [alone(runtime, p) for p in prompts]
    sched = scheduler(runtime, block=128)
    keys = {k for p in prompts[:2] for k in block_keys(p, 128)}

    assert generate(sched, prompts[:2]) == want[:2]
    stats = sched.prefix.stats()
    assert (stats["hits"], stats["misses"], stats["blocks"]) == (0, 2, len(keys))

    before = sched.backend.positions
    assert generate(sched, prompts[2:4]) == want[2:4]
    stats = sched.prefix.stats()
    reused = shared(prompts[2], prompts[3]) // 128 * 128
    assert stats["hits"] == 2 and stats["tokens_reused"] == 2 * reused and reused >= 1024
    new = max(len(p.ids) for p in prompts[2:4]) - reused
    assert sched.backend.positions - before == 2 * new  # one batched call over the new tokens

    cold = tok.chat_prompt([("user", [Segment(text="Book a table for two at 7pm " * 30)])], False)
    assert generate(sched, [cold, prompts[4], prompts[5]]) == [alone(runtime, cold)] + want[4:]
    assert sched.prefix.stats()["hits"] == 4
