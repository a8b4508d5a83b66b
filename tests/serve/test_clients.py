"""The real ``openai`` SDK and LangChain's ``ChatOpenAI`` against ``autoglm-build serve``."""

from __future__ import annotations

import base64
import io
import wave
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import ROOT

MODEL = "autoglm-phone-9b"
THINK = {"enable_thinking": True, "return_reasoning": True}


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)


def _stream(client, **kwargs):
    reasoning, content, finish, usage = "", "", None, None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True},
                                                **kwargs):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            finish = choice.finish_reason or finish
    return reasoning, content, finish, usage


def test_models_lists_the_served_model(client):
    assert MODEL in [m.id for m in client.models.list().data]


def test_chat_completion(client):
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "打开设置"}],
                                          max_tokens=12, temperature=0.5, seed=1)
    msg = resp.choices[0].message
    assert isinstance(msg.content, str) and msg.content
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 12 and resp.usage.prompt_tokens > 0


def test_streamed_and_whole_replies_agree_with_reasoning_separated(client):
    # EOS ignored: what the random model samples (which differs between the host sampler and the GPU's select) may
    # end the reply right after </think> (on TensorRT it did, content ''), and both parts must have text
    kwargs = dict(messages=[{"role": "user", "content": "你是谁?"}], max_tokens=48, temperature=0.5, seed=11,
                  extra_body={**THINK, "thinking_budget": 16, "ignore_eos": True})
    reasoning, content, finish, usage = _stream(client, **kwargs)
    whole = client.chat.completions.create(model=MODEL, **kwargs)
    msg = whole.choices[0].message
    assert (reasoning, content) == (msg.model_extra["reasoning_content"], msg.content)
    assert reasoning and content and "<think>" not in content and "</think>" not in content
    assert usage.completion_tokens_details.reasoning_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_reasoning_stays_in_content_without_tags_unless_asked_for_separately(client):
    """vLLM's default (skip_special_tokens, no reasoning parser): the thinking text is part of content, the
    <think>/</think> tokens are not; return_reasoning moves the thinking to reasoning_content."""
    common = dict(model=MODEL, messages=[{"role": "user", "content": "你是谁?"}], max_tokens=40, seed=5)
    shown = client.chat.completions.create(**common, extra_body=THINK).choices[0].message
    inline = client.chat.completions.create(**common, extra_body={"enable_thinking": True}).choices[0].message
    assert shown.model_extra["reasoning_content"]
    assert inline.content == shown.model_extra["reasoning_content"] + shown.content
    assert "reasoning_content" not in (inline.model_extra or {})
    assert "<think>" not in inline.content and "</think>" not in inline.content


def test_completions_whole_and_streamed(client):
    whole = client.completions.create(model=MODEL, prompt="Open WeChat and", max_tokens=10, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Open WeChat and", max_tokens=10, temperature=0, stream=True) if c.choices)
    assert whole.choices[0].text == streamed and streamed
    assert whole.object == "text_completion"


def test_stop_sequence_ends_the_reply_before_it(client):
    # EOS ignored: the random model's greedy reply is 30 tokens whatever the engines' precision picks (TensorRT's FP16
    # engines ended it after two characters)
    common = dict(model=MODEL, prompt="hello", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    base = client.completions.create(**common).choices[0].text
    cut = base[5:8]
    assert cut, base
    stopped = client.completions.create(**common, stop=[cut])
    assert stopped.choices[0].text == base[:base.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"


def test_langchain_chatopenai_as_the_deployment_guide_calls_it(server, client):
    ChatOpenAI = pytest.importorskip("langchain_openai", reason="langchain-openai not installed").ChatOpenAI

    llm = ChatOpenAI(model="autoglm-phone-9b", temperature=0.5, api_key="EMPTY", base_url=server.base_url,
                     extra_body={"enable_thinking": True, "return_reasoning": True}, streaming=True)
    reply = llm.invoke("你是谁?")
    # Unseeded sampling on random weights may pick a stop token while still thinking: the answer can be
    # empty, never the reasoning's tags.
    assert isinstance(reply.content, str) and reply.response_metadata["finish_reason"] in ("stop", "length")
    assert "<think>" not in reply.content and "</think>" not in reply.content

    # Seeded, so the SDK's stream shows what LangChain got: the answer, with the reasoning apart. The
    # first seed whose sample reaches the answer (most do; the backend's numerics decide which).
    for seed in range(1, 9):
        reasoning, content, _, _ = _stream(client, messages=[{"role": "user", "content": "你是谁?"}],
                                           temperature=0.5, seed=seed, extra_body=THINK)
        if content.strip():
            break
    else:
        pytest.fail("no seed of 1..8 reached the answer after the reasoning")
    seeded = ChatOpenAI(model="autoglm-phone-9b", temperature=0.5, api_key="EMPTY", base_url=server.base_url,
                        extra_body={"enable_thinking": True, "return_reasoning": True}, streaming=True, seed=seed)
    assert seeded.invoke("你是谁?").content == content
    assert reasoning and reasoning not in content


# ---- media -------------------------------------------------------------------------------------


def _image_url(path: Path) -> str:
    return f"data:image/{path.suffix.lstrip('.').replace('jpg', 'jpeg')};base64," + \
        base64.b64encode(path.read_bytes()).decode()


def _chat_usage(client, parts):
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],
                                          max_tokens=16, temperature=0)
    return resp.choices[0].message.content, resp.usage


def test_image_and_audio_are_spliced_into_the_decoder_input(client, tiny_cfg):
    pytest.importorskip("transformers", reason="audio preprocessing uses transformers' Whisper features")
    from PIL import Image

    from autoglm_build.imaging import VisionGeometry, image_tokens

    images = sorted((ROOT / "calibration_data" / "images").glob("*.jpg"))[:2]
    wav = sorted((ROOT / "calibration_data" / "audio").glob("*.wav"))[0]
    text = [{"type": "text", "text": "这是什么?"}]
    base_reply, base = _chat_usage(client, text)
    replies = []
    for image in images:
        reply, usage = _chat_usage(client, [{"type": "image_url", "image_url": {"url": _image_url(image)}}, *text])
        with Image.open(image) as img:
            n = image_tokens(img.height, img.width, VisionGeometry.of(tiny_cfg.vision))
        assert usage.model_dump()["prompt_tokens_details"]["image_tokens"] == n, usage
        assert usage.prompt_tokens == base.prompt_tokens + n + 2  # + <|begin_of_image|>, <|end_of_image|>
        replies.append(reply)
    with wave.open(str(wav)) as fh:
        frames = fh.getnframes()
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.read_bytes()).decode(),
                                                    "format": "wav"}}
    reply, usage = _chat_usage(client, [audio, *text])
    a = tiny_cfg.audio
    mel = min(a.max_frames, -(-frames // 160 // a.frame_multiple) * a.frame_multiple)
    assert usage.prompt_tokens_details.audio_tokens == mel // a.frame_multiple
    assert usage.prompt_tokens == base.prompt_tokens + mel // a.frame_multiple + 2
    # different inputs, different greedy replies: the embeddings reached the decoder
    assert len({base_reply, *replies, reply}) == 4


def test_a_phone_screenshot_is_read_at_native_resolution(client, tiny_cfg):
    """The phone agent's request: a 1080x2400 PNG first, then the task text."""
    screenshot = ROOT / "calibration_data" / "images" / "screen_settings.png"
    text = {"type": "text", "text": "打开蓝牙\n\n{\"current_app\": \"Settings\"}"}
    _, usage = _chat_usage(client, [{"type": "image_url", "image_url": {"url": _image_url(screenshot)}}, text])
    from PIL import Image

    small = io.BytesIO()
    Image.open(screenshot).resize((112, 112)).save(small, format="PNG")
    thumb_url = "data:image/png;base64," + base64.b64encode(small.getvalue()).decode()
    _, thumb = _chat_usage(client, [{"type": "image_url", "image_url": {"url": thumb_url}}, text])
    # 1080x2400 at the tiny config's max_pixels: 644x280 px, 46x20 patches, 23x10 = 230 tokens
    assert usage.model_dump()["prompt_tokens_details"]["image_tokens"] == 230
    assert thumb.model_dump()["prompt_tokens_details"]["image_tokens"] == 16  # 112x112: 8x8 patches


def test_wav_bytes_helper_is_what_calibration_ships():
    wav = sorted((ROOT / "calibration_data" / "audio").glob("*.wav"))[0]
    with wave.open(io.BytesIO(wav.read_bytes())) as fh:
        assert fh.getframerate() == 16000
