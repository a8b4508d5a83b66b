"""Each bad request: its status code, OpenAI's error body, and a server that keeps serving."""

from __future__ import annotations

import base64

import httpx
import pytest

MODEL = "autoglm-phone-9b"
CHAT = "/v1/chat/completions"


def _user(content):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4}


def _bomb_url() -> str:
    """A 20000x20000 PNG of 47 KB: refused from its header, before any pixel is decoded."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


CASES = {
    "malformed JSON": (CHAT, b'{"model": "autoglm-phone-9b", "messages": [', 400, None, None),
    "not an object": (CHAT, b"[1, 2]", 400, None, None),
    "missing messages": (CHAT, {"model": MODEL}, 400, "messages", None),
    "wrong field type": (CHAT, {**_user("hi"), "temperature": "hot"}, 400, "temperature", None),
    "bad role": (CHAT, {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role",
                 None),
    "n > 1": (CHAT, {**_user("hi"), "n": 2}, 400, "n", None),
    "unknown model": (CHAT, {**_user("hi"), "model": "gpt-4o"}, 404, "model", "model_not_found"),
    "context overflow": (CHAT, {**_user("hi"), "max_tokens": 16384}, 400, "max_tokens", "context_length_exceeded"),
    "remote image URL": (CHAT, _user([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]),
                         400, "messages.0.content.0.image_url.url", None),
    "corrupt image": (CHAT, _user([{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"\x89PNG not really").decode()}}]),
        400, "messages.0.content.0.image_url", None),
    "audio not base64": (CHAT, _user([{"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}]),
                         400, "messages.0.content.0.input_audio.data", None),
    "audio not wav": (CHAT, _user([{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(b"RIFF....nope").decode(), "format": "wav"}}]),
        400, "messages.0.content.0.input_audio", None),
    "negative seed": (CHAT, {**_user("hi"), "seed": -1}, 400, "seed", None),
    "penalty out of range": (CHAT, {**_user("hi"), "frequency_penalty": 2.5}, 400, "frequency_penalty", None),
    "deeply nested JSON": (CHAT, b"[" * 100_000 + b"]" * 100_000, 400, None, None),
    "decompression bomb PNG": (CHAT, _user([{"type": "image_url", "image_url": {"url": _bomb_url()}}]),
                               400, "messages.0.content.0.image_url", None),
    "completions echo": ("/v1/completions", {"model": MODEL, "prompt": "hi", "echo": True}, 400, "echo", None),
    "empty prompt": ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt", None),
    "unknown path": ("/v1/embeddings", {"model": MODEL, "input": "hi"}, 404, None, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_openai_error(server, case):
    path, body, status, param, code = CASES[case]
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    resp = httpx.post(server.url + path, timeout=30, **kwargs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
        assert error["message"].startswith(param) or code, error
    if code is not None:
        assert error["code"] == code
    # and the server keeps serving
    ok = httpx.post(server.url + CHAT, json=_user("hi"), timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def test_body_over_the_cap_is_413(server, tiny_cfg):
    big = "x" * (tiny_cfg.serve.max_body_bytes + 1)
    resp = httpx.post(server.url + CHAT, json=_user(big), timeout=60)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_chunked_body_over_the_cap_is_413(server, tiny_cfg):
    def chunks():
        for _ in range(tiny_cfg.serve.max_body_bytes // (1 << 20) + 2):
            yield b"x" * (1 << 20)

    resp = httpx.post(server.url + CHAT, content=chunks(), timeout=60)
    assert resp.status_code == 413
