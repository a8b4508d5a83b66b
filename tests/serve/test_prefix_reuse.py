"""Prefix reuse through the server: the phone agent's steps answered by a server that reuses its history's
keys/values equal those of a server that prefills every prompt whole ($AUTOGLM_BUILD_PREFIX_CACHE_MIB=0),
and /metrics and /ready say what was reused. The second server also decodes one step after the other
($AUTOGLM_BUILD_OVERLAP=0), the first launching each step before the previous one's text (serve.overlap) on
TensorRT."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, List

import httpx
import pytest
from openai import OpenAI

from autoglm_build.serve.server import OVERLAP_ENV, PREFIX_CACHE_ENV
from tests.serve.conftest import BACKEND, Server, running_server
from tests.serve.test_agent import MODEL, SCREENS, png_url, split_reply, stream_step, system_prompt, user_turn


@pytest.fixture(scope="module")
def whole(served_build: Path, tmp_path_factory) -> Iterator[Server]:
    """A second server over the same build without prefix reuse or decode overlap."""
    env = {PREFIX_CACHE_ENV: "0", OVERLAP_ENV: "0"}
    with running_server(served_build, tmp_path_factory.mktemp("serve-whole"), env=env) as srv:
        yield srv


def metrics(server: Server) -> Dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    return {name: float(value) for name, value in (line.split() for line in text.splitlines()
                                                   if line and not line.startswith("#"))}


def steps(server: Server, screens: List[str], max_tokens: int = 24) -> List[str]:
    """The agent's session: one streamed step per screenshot, each with the history before it."""
    client = OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)
    messages, replies = [{"role": "system", "content": system_prompt()}], []
    for k, screen in enumerate(screens):
        messages.append(user_turn("打开蓝牙" if k == 0 else "** Screen Info **", "System Settings",
                                  png_url(SCREENS / screen)))
        reply = stream_step(client, messages, max_tokens=max_tokens)
        replies.append(reply)
        messages[-1]["content"] = [p for p in messages[-1]["content"] if p["type"] == "text"]
        thinking, action = split_reply(reply)
        messages.append({"role": "assistant", "content": f"<think>{thinking}</think><answer>{action}</answer>"})
    return replies


def test_agent_steps_reuse_their_history_and_answer_as_a_whole_prefill_does(server, whole):
    screens = ["screen_settings.png", "screen_chat.png", "screen_home.png"]
    reused, plain = steps(server, screens), steps(whole, screens)
    assert reused == plain
    on, off = metrics(server), metrics(whole)
    assert on["autoglm_prefix_cache_hits_total"] >= 2  # steps 2 and 3
    assert on["autoglm_prefix_cache_tokens_reused_total"] >= 2 * 4096  # the system prompt, twice at least
    assert on["autoglm_prefill_tokens_total"] < off["autoglm_prefill_tokens_total"] - 2 * 4096
    assert off["autoglm_prefix_cache_hits_total"] == off["autoglm_prefix_cache_bytes"] == 0
    ahead = BACKEND == "tensorrt"  # ONNX Runtime computes a step before it returns: nothing to overlap
    assert (on["autoglm_overlapped_steps_total"] > 0) == ahead and off["autoglm_overlapped_steps_total"] == 0
    ready = httpx.get(server.url + "/ready").json()
    assert ready["prefix_cache"]["bytes"] == on["autoglm_prefix_cache_bytes"] > 0
    assert ready["overlap"] is ahead and httpx.get(whole.url + "/ready").json()["overlap"] is False


def test_two_concurrent_requests_with_one_prefix_answer_as_alone(server, whole):
    def ask(target: Server, task: str) -> str:
        client = OpenAI(base_url=target.base_url, api_key="EMPTY", max_retries=0)
        messages = [{"role": "system", "content": system_prompt()}, {"role": "user", "content": task}]
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0.0,
                                              frequency_penalty=0.2).choices[0].message.content

    tasks = ["打开蓝牙", "Open the settings app and turn on dark mode"]
    alone = [ask(whole, t) for t in tasks]
    ask(server, "你是谁?")  # the system prompt's blocks held
    hits = metrics(server)["autoglm_prefix_cache_hits_total"]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda t: ask(server, t), tasks))
    assert together == alone
    assert metrics(server)["autoglm_prefix_cache_hits_total"] == hits + 2  # the system prompt was held
