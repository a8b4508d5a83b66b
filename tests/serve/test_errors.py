"""Each bad request: its status code, OpenAI's error body, and a server that keeps serving."""

from __future__ import annotations

import base64

import httpx
import pytest

MODEL = "autoglm-phone-9b"
CHAT = "/v1/chat/completions"


def _user(content):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4}


def _unread(server, served_build, param: str) -> str:
    """The field a build without an audio module names for an audio part's error at ``param``: such a build (the GPU
    harness's tiny engines are built without audio) refuses the part itself before reading its data, so the field is
    the part, ``messages.<i>.content.<j>``. ``param`` itself where the build has audio, and for the audio's
    ``format``, which the request's schema checks first. Whether the build has audio is read from its manifest (the
    graphs or engines of the served backend and precision), and the server must serve it where it has it."""
    from autoglm_build.manifest import Manifest
    from autoglm_build.parts import module_parts
    from autoglm_build.runtime.backends import engine_artifact, graph_artifact

    if "input_audio" not in param or param.endswith(".format"):
        return param
    ready = httpx.get(server.url + "/ready", timeout=30).json()
    manifest = Manifest.load(served_build)
    find = engine_artifact if ready["backend"] == "tensorrt" else graph_artifact
    built = all(find(manifest, part, ready["precision"]) for part in module_parts(manifest.config, "audio"))
    served = any(name == "audio" or name.startswith("audio.") for name in ready["files"])
    assert served == built, f"audio built: {built}; served: {served}"
    return param if built else ".".join(param.split(".")[:4])


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
def test_bad_request_gets_openai_error(server, served_build, case):
    path, body, status, param, code = CASES[case]
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    resp = httpx.post(server.url + path, timeout=30, **kwargs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["type"]
    unread = param if param is None else _unread(server, served_build, param)
    if unread != param:
        param = unread
        assert error["message"] == f"{param}: this build has no audio module", error
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


def _wav(encoding: int = 1, width: int = 2) -> str:
    """A 0.1 s 16 kHz mono WAV, its format code (1 = PCM) set to ``encoding``, base64."""
    import io
    import struct
    import wave

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(width)
        fh.setframerate(16000)
        fh.writeframes(b"\0" * 1600 * width)
    data = buffer.getvalue()
    return base64.b64encode(data[:20] + struct.pack("<H", encoding) + data[22:]).decode()


def _image(data: bytes) -> list:
    return [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}]


def _audio(data: str, fmt: str = "wav") -> list:
    return [{"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]


# content of the second message -> (param, what the message must say after it)
MEDIA_CASES = {
    "image of unknown format": (_image(b"GIF? no, just text"), "messages.1.content.0.image_url",
                                "not a readable image (format not recognized)"),
    "empty image data": (_image(b""), "messages.1.content.0.image_url.url", "the data: URL holds no image data"),
    "mp3 format": (_audio(_wav(), "mp3"), "messages.1.content.0.input_audio.format",
                   "audio format 'mp3' is not supported; send 'wav'"),
    "float WAV": (_audio(_wav(encoding=3, width=4)), "messages.1.content.0.input_audio",
                  "32-bit float WAV is not supported; send 16 kHz mono 16-bit PCM WAV"),
    "not a WAV": (_audio(base64.b64encode(b"ID3\x03" + bytes(64)).decode()), "messages.1.content.0.input_audio",
                  "not a WAV file (no RIFF/WAVE header)"),
    "unknown part type": ([{"type": "video_url", "video_url": {"url": "x"}}], "messages.1.content.0",
                          "a content part needs a type of 'text', 'image_url' or 'input_audio'"),
    "content not a list": (42, "messages.1.content", "content must be a string or a list of content parts"),
}


@pytest.mark.parametrize("case", list(MEDIA_CASES))
def test_media_errors_name_the_field_in_one_line(server, served_build, case):
    content, param, says = MEDIA_CASES[case]
    body = {"model": MODEL, "max_tokens": 2,
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]}
    resp = httpx.post(server.url + CHAT, json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    unread = _unread(server, served_build, param)
    if unread != param:
        param, says = unread, "this build has no audio module"
    assert error["param"] == param
    assert error["message"].startswith(f"{param}: ") and says in error["message"], error
    assert "\n" not in error["message"] and " at 0x" not in error["message"]


def test_wav_problem_reads_the_chunk_headers():
    from autoglm_build.runtime.media import wav_problem

    pcm = base64.b64decode(_wav())
    assert wav_problem(pcm) is None  # well-formed: load_wav's own reason (rate, channels) stands
    assert wav_problem(pcm[:14]).startswith("truncated WAV data (no complete 'fmt ' chunk)")
    assert wav_problem(pcm[:36]).startswith("truncated WAV data (no 'data' chunk)")
    assert wav_problem(base64.b64decode(_wav(encoding=7))).startswith("mu-law WAV is not supported")
    assert wav_problem(base64.b64decode(_wav(encoding=0x1234))).startswith("format 4660 WAV is not supported")


def test_a_build_without_audio_refuses_an_audio_part_as_a_whole_and_keeps_serving(served_build, tmp_path):
    """The GPU harness's tiny engines are built without audio: an audio part is refused naming the part, before any
    of its data is read, in one line; text requests are served."""
    import shutil

    from autoglm_build.manifest import Manifest
    from tests.serve.conftest import running_server

    workdir = tmp_path / "no-audio"
    shutil.copytree(served_build, workdir)  # the GPU harness: its engines, built without audio
    manifest = Manifest.load(workdir)
    manifest.artifacts = {key: art for key, art in manifest.artifacts.items() if art.module != "audio"}
    manifest.save(workdir)
    with running_server(workdir, tmp_path) as srv:
        assert not any(name.startswith("audio") for name in httpx.get(srv.url + "/ready", timeout=30).json()["files"])
        resp = httpx.post(srv.url + CHAT, json=_user(_audio("%%%")), timeout=30)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert (error["param"], error["message"]) == ("messages.0.content.0",
                                                      "messages.0.content.0: this build has no audio module")
        ok = httpx.post(srv.url + CHAT, json=_user("hi"), timeout=30)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None
