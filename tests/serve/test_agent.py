"""The phone agent's request contract, replayed against the tiny build.

What the open-source Open-AutoGLM client sends each step (``phone_agent/model/client.py``, ``agent.py``):
the openai SDK, ``api_key="EMPTY"``, a streamed chat with ``max_tokens`` 3000, ``temperature`` 0,
``top_p`` 0.85, ``frequency_penalty`` 0.2; a system prompt (~3.4K characters of Chinese) that begins
with today's date; a user turn with the full-size screenshot first (PNG, never resized) and the task
text second; earlier assistant turns sent back as ``<think>..</think><answer>..</answer>``, earlier user
turns without their image. It reads only ``delta.content`` (skipping chunks without choices) and parses
the text after ``do(action=`` / ``finish(message=``, so no tag may reach ``content``.

The system prompt below is our own text in the shape of the client's (date line, then the action rules);
the client's own prompt is not copied here.
"""

from __future__ import annotations

import base64
import datetime
import io
from pathlib import Path

import pytest
from openai import OpenAI
from PIL import Image

from tests.conftest import ROOT

MODEL = "autoglm-phone-9b"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
SCREENS = ROOT / "calibration_data" / "images"
RULES = """你是一个手机操作助手, 根据用户的任务和当前屏幕截图, 每一步只输出一个操作。
先在 <think> 中说明你看到了什么、下一步为什么这样做, 再在 <answer> 中给出操作。
可用的操作:
do(action="Launch", app="应用名") 打开应用; do(action="Tap", element=[x,y]) 点击坐标, 坐标范围 0 到 999;
do(action="Type", text="文字") 在输入框中输入; do(action="Swipe", start=[x1,y1], end=[x2,y2]) 滑动屏幕;
do(action="Back") 返回上一页; do(action="Home") 回到桌面; do(action="Long Press", element=[x,y]) 长按;
do(action="Wait", duration="2 seconds") 等待页面加载; do(action="Take_over", message="原因") 需要用户接管;
finish(message="结果") 任务完成或无法完成时结束。
规则: 1. 先确认当前应用是否正确, 不正确就先打开目标应用。 2. 页面没有加载完成时等待, 不要重复点击。
3. 找不到目标时先滑动查找, 仍找不到再返回上一级换一个入口。 4. 登录、支付、验证码等敏感操作交给用户接管。
5. 输入文字前先点击输入框, 输入后检查是否需要点击搜索或发送。 6. 每一步只执行一个操作, 不要一次输出多个操作。
7. 操作失败时分析原因并换一种方式, 不要无限重复同一个操作。 8. 任务完成后用 finish 说明结果。
"""


def system_prompt() -> str:
    """Today's date first, then the rules, about 3.4K characters as the client's is."""
    text = f"今天的日期是: {datetime.date.today():%Y年%m月%d日}\n"
    while len(text) < 3400:
        text += RULES
    return text


def png_url(path: Path, rotate: bool = False) -> str:
    img = Image.open(path)
    if rotate:  # a landscape screenshot: 2400x1080
        img = img.transpose(Image.Transpose.ROTATE_90)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user_turn(task: str, app: str, screenshot: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": screenshot}},
                                        {"type": "text", "text": f"{task}\n\n{{\"current_app\": \"{app}\"}}"}]}


def stream_step(client: OpenAI, messages: list, max_tokens: int = 3000) -> str:
    """One agent step as the client makes it: streamed, its sampling, only delta.content read."""
    content = ""
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0.0,
                                                top_p=0.85, frequency_penalty=0.2, stream=True):
        if not chunk.choices:
            continue
        if chunk.choices[0].delta.content is not None:
            content += chunk.choices[0].delta.content
    return content


def split_reply(content: str) -> tuple:
    """The client's parse: thinking before the action marker, the action from it on."""
    for marker in ("finish(message=", "do(action="):
        if marker in content:
            thinking, action = content.split(marker, 1)
            return thinking.strip(), marker + action
    return "", content


@pytest.fixture(scope="module")
def agent(server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)


def test_the_phone_agent_runs_two_steps(agent, tiny_cfg):
    probe = agent.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert probe.choices[0].message.content is not None and probe.usage.completion_tokens <= 5

    portrait = png_url(SCREENS / "screen_settings.png")  # 1080x2400
    messages = [{"role": "system", "content": system_prompt()},
                user_turn("打开蓝牙", "System Settings", portrait)]
    first = stream_step(agent, messages)
    assert not any(tag in first for tag in TAGS), first
    # the same request, not streamed, for its usage: the screenshot at native resolution
    usage = agent.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0.0).usage
    assert usage.model_dump()["prompt_tokens_details"]["image_tokens"] == 230  # 644x280 px at the tiny max_pixels

    thinking, action = split_reply(first)
    messages[-1]["content"] = [p for p in messages[-1]["content"] if p["type"] == "text"]  # the client drops it
    messages.append({"role": "assistant", "content": f"<think>{thinking}</think><answer>{action}</answer>"})
    messages.append(user_turn("** Screen Info **", "System Settings", png_url(SCREENS / "screen_settings.png",
                                                                              rotate=True)))
    second = stream_step(agent, messages)
    assert not any(tag in second for tag in TAGS), second
    usage = agent.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0.0).usage
    assert usage.model_dump()["prompt_tokens_details"]["image_tokens"] == 230  # landscape: 280x644 px, one image


def test_assistant_history_tags_are_glm_special_tokens(tiny_cfg):
    from autoglm_build.calibration import tokenizer_for
    from autoglm_build.runtime.text import ChatTokenizer, Segment

    tok = ChatTokenizer(tokenizer_for(tiny_cfg)[0], tiny_cfg.text.vocab_size)
    reply = '<think>屏幕上是设置页</think><answer>do(action="Tap", element=[500, 300])</answer>'
    ids = tok.build([Segment(text=reply)]).ids
    for tag in TAGS:
        assert ids.count(tok.ids[tag]) == 1, tag
    assert tok.decode(ids) == '屏幕上是设置页do(action="Tap", element=[500, 300])'
