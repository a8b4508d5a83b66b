"""Images from concurrent requests are decoded and preprocessed at the same time; only the encoder call,
whose engine has one execution context, is taken one at a time (``ServerState.media_lock``)."""

from __future__ import annotations

import base64
import io
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from autoglm_build import imaging
from autoglm_build.config import load_config
from autoglm_build.serve.app import media_segment
from autoglm_build.serve.protocol import ImagePart
from tests.conftest import TINY


class CountingEncoder:
    """A stand-in for the backend's vision call that records how many calls were inside it at once."""

    files = {"vision": "vision.onnx"}
    parts = {"vision": ["vision"]}  # the modules loaded (a staged tower: its stages)
    vision_patches = None

    def __init__(self) -> None:
        self.inside = 0
        self.most = 0
        self.count = threading.Lock()

    def encode(self, module: str, feed: dict, output: str) -> np.ndarray:
        with self.count:
            self.inside += 1
            self.most = max(self.most, self.inside)
        time.sleep(0.05)
        with self.count:
            self.inside -= 1
        tokens = len(feed["pixel_values"]) // 4
        return np.zeros((tokens, 8), np.float32)


def _png_url(width: int, height: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_two_requests_preprocess_at_once_and_encode_one_at_a_time(monkeypatch):
    both = threading.Barrier(2, timeout=20)
    real = imaging.preprocess

    met = []

    def meeting(image, geometry):
        both.wait()  # returns only when the other request is preprocessing too: the lock is not held here
        met.append(1)
        return real(image, geometry)

    monkeypatch.setattr(imaging, "preprocess", meeting)
    encoder = CountingEncoder()
    state = SimpleNamespace(backend=encoder, cfg=load_config(TINY), media_lock=threading.Lock())
    part = ImagePart.model_validate({"type": "image_url", "image_url": {"url": _png_url(320, 720)}})
    results, errors = [], []

    def request(k: int) -> None:
        try:
            results.append(media_segment(state, part, f"messages.{k}.content.0"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=request, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(met) == 2 and len(results) == 2 and encoder.most == 1
    assert results[0].grid == results[1].grid and results[0].key == results[1].key


def test_a_bad_image_still_names_its_field():
    from autoglm_build.serve.app import APIError

    state = SimpleNamespace(backend=CountingEncoder(), cfg=load_config(TINY), media_lock=threading.Lock())
    part = ImagePart.model_validate({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})
    with pytest.raises(APIError, match="messages.3.content.1.image_url"):
        media_segment(state, part, "messages.3.content.1")
