"""Test helpers: tiny checkpoints in transformers' layout, ONNX Runtime sessions."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from autoglm_build.config import BuildConfig
from autoglm_build.onnx_io import feed_for


def save_hf_checkpoint(cfg: BuildConfig, directory: Path, seed: int = 7, shards: int = 2):
    """transformers' Glm4vForConditionalGeneration plus our audio module, saved as sharded safetensors.

    Returns the in-memory reference model (``Glm4vForConditionalGeneration``) and the audio module.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import Glm4vForConditionalGeneration

    from autoglm_build.modules import registry
    from autoglm_build.modules.hf_configs import glm4v_config

    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(glm4v_config(cfg)).eval()
    audio = registry.get("audio").build(cfg)
    with torch.no_grad():
        for p in audio.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # differ from the seeded random init
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.update({"audio_encoder." + k[len("encoder."):]: v for k, v in audio.state_dict().items()
                  if k.startswith("encoder.")})
    state.update({"audio_projector." + k[len("projector."):]: v for k, v in audio.state_dict().items()
                  if k.startswith("projector.")})
    directory.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(directory / "config.json"))
    keys = sorted(state)
    for i in range(shards):
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(directory / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"))
    return model, audio


def session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(path: Path, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed_for(sess, {i.name: feed[i.name] for i in sess.get_inputs()}))))
