#!/usr/bin/env python
"""Train the tiny config's modules on the shipped calibration data, so its accuracy figures mean something.

On seeded random weights the tiny decoder's logits are nearly flat, so INT8-vs-FP32 greedy agreement
is a coin toss between near-equal logits (issue 16, item 7). This script trains all four modules
(vision tower, speech encoder + projector, embedding table, decoder) together, on CPU, as one small
multimodal language model on ``calibration_data/``:

- each of the 36 agent prompts in calibrate's chat format (``calibration.CHAT_TEMPLATE``), the
  assistant echoing the instruction;
- each image (a caption written here per file, since the data has none) and each spoken instruction
  (its ``audio/transcripts.jsonl`` text), spliced in as the server splices media
  (``runtime.text.ChatTokenizer.build``: GLM's ``<|begin_of_image|>`` span and 3-part positions).

Next-token cross-entropy on every text target, AdamW, a fixed number of steps, until the decoder's
next-token distribution is peaked (the script prints the mean top-1 probability on the prompts'
assistant positions). The weights are written in FP16 (the loader casts them to the module's
dtype) in the Hugging Face layout the checkpoint loader reads (``model.visual.*``,
``model.language_model.*``, ``lm_head.*``, ``audio_encoder.*``, ``audio_projector.*``), one file,
under 5 MB.

Reproducible: one seed, one CPU thread, deterministic algorithms, data in a fixed order, no
timestamps in the file; two runs on the same machine write the same bytes
(``tests/test_train_tiny.py``). Bits may differ on another CPU architecture (other kernels); the
shipped file's sha256 is recorded in ``configs/checkpoints/autoglm-phone-tiny/SHA256``.

    .venv/bin/python scripts/train_tiny.py                 # writes configs/checkpoints/autoglm-phone-tiny/
    .venv/bin/python scripts/train_tiny.py --steps 3 --out /tmp/ckpt   # the short mode the test runs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoglm_build.calibration import (  # noqa: E402
    CHAT_TEMPLATE,
    CalibrationData,
    load_image_patches,
    load_prompts,
    load_wav,
    log_mel,
    tokenizer_for,
)
from autoglm_build.config import BuildConfig, load_config  # noqa: E402
from autoglm_build.imaging import pack  # noqa: E402
from autoglm_build.modules import registry  # noqa: E402
from autoglm_build.runtime.text import ChatTokenizer, Segment  # noqa: E402

CONFIG = ROOT / "configs" / "autoglm-phone-tiny.yaml"
OUT = ROOT / "configs" / "checkpoints" / "autoglm-phone-tiny"
STEPS = 300
LR = 3e-3
SEED = 0
#: captions of the shipped images (the data has none): what each shows, after calibration_data/README.md
CAPTIONS = {
    "astronaut": "A portrait of an astronaut in a white space suit in front of a flag.",
    "camera": "A black and white photo of a man with a camera on a tripod.",
    "chelsea": "A photo of an orange cat named Chelsea.",
    "coffee": "A cup of coffee on a saucer, seen from above.",
    "hubble_deep_field": "Thousands of distant galaxies in the Hubble deep field.",
    "motorcycle_left": "A red motorcycle parked in a studio.",
    "page": "A scanned page of printed text.",
    "retina": "A photo of the retina of a human eye with blood vessels.",
    "rocket": "A SpaceX rocket lifting off from the launch pad.",
    "text": "Handwritten text and numbers on a grey background.",
    "screen_chat": "A phone screen: a chat conversation with message bubbles.",
    "screen_home": "A phone screen: the home screen with a grid of app icons.",
    "screen_login": "A phone screen: a login form with user name and password.",
    "screen_map": "A phone screen: a map app with streets and a search bar.",
    "screen_settings": "A phone screen: the settings list with Wi-Fi and Bluetooth.",
    "screen_shop": "A phone screen: a shopping app with products and prices.",
}
# Module state-dict prefix -> checkpoint prefix (the first candidate of each ModuleSpec.weight_prefixes)
LAYOUT = {"vision": {"visual.": "model.visual."},
          "audio": {"encoder.": "audio_encoder.", "projector.": "audio_projector."},
          "embed": {"embed_tokens.": "model.language_model.embed_tokens."},
          "decoder": {"language_model.": "model.language_model.", "lm_head.": "lm_head."}}


@dataclass
class Example:
    """One training sequence: ids, (3, S) positions, and where its media embeddings go."""

    ids: List[int]
    positions: np.ndarray
    media: Optional[Tuple[str, int, Dict[str, np.ndarray]]] = None  # (kind, splice start, module feed)


def examples(cfg: BuildConfig, chat: ChatTokenizer) -> Tuple[List[Example], List[Example], List[Example]]:
    """(text, image, audio) examples from ``calibrate.data``, in a fixed order."""
    data = CalibrationData.discover(Path(cfg.calibrate.data))
    end = "<|user|>"  # a stop token: the assistant's turn ends
    text = []
    for prompt in load_prompts(data.prompts_file):
        # one format only: a second opening after the same "<|assistant|>\n" (the server's empty
        # "<think></think>") made that position a 50/50 tie, where greedy agreement is a coin toss
        p = chat.build([Segment(text=CHAT_TEMPLATE.format(prompt=prompt) + prompt + end)])
        text.append(Example(p.ids, p.positions))
    merge = cfg.vision.spatial_merge_size
    images = []
    for path in data.require("images"):
        patches = load_image_patches(path, cfg.vision)
        count = patches.patches // merge ** 2
        media = Segment(media="image", embeds=np.zeros((count, 1)), grid=patches.merged_grid(merge))
        images.append(_media_example(chat, media, "Describe the image.", CAPTIONS[path.stem] + end,
                                     pack([patches], merge)))
    transcripts = {}
    for line in (data.root / "audio" / "transcripts.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            transcripts[row["file"]] = row["text"]
    a = cfg.audio
    clips = []
    for path in data.require("audio"):
        features = log_mel(load_wav(path), a.num_mel_bins, a.frame_multiple, a.max_frames)
        count = features.shape[1] // (2 * a.projector_stack)
        media = Segment(media="audio", embeds=np.zeros((count, 1)))
        clips.append(_media_example(chat, media, "", transcripts[path.name] + end,
                                    {"input_features": features[None]}))
    return text, images, clips


def _media_example(chat: ChatTokenizer, media: Segment, ask: str, answer: str, feed) -> Example:
    parts = [Segment(text="[gMASK]<sop><|user|>\n"), media, Segment(text=ask + "<|assistant|>\n" + answer)]
    prompt = chat.build(parts)
    (start, _), = prompt.splices
    return Example(prompt.ids, prompt.positions, (media.media, start, feed))


class Model:
    """The four modules, trained together (the decoder with logits at every position)."""

    def __init__(self, cfg: BuildConfig) -> None:
        import torch

        all_logits = cfg.model_copy(update={"export": cfg.export.model_copy(update={"logits": "all"})})
        self.modules = {name: registry.get(name).build(all_logits).train() for name in LAYOUT}
        self.cfg = cfg
        self.torch = torch

    def parameters(self):
        return [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]

    def loss(self, batch: List[Example]):
        """Mean next-token cross-entropy over the text targets of a right-padded batch."""
        torch = self.torch
        length = max(len(e.ids) for e in batch)
        ids = torch.zeros((len(batch), length), dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        positions = torch.zeros((len(batch), 3, length), dtype=torch.long)
        targets = torch.full((len(batch), length), -100, dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e.ids)
            ids[row, :n] = torch.tensor(e.ids)
            mask[row, :n] = 1
            positions[row, :, :n] = torch.from_numpy(e.positions)
            targets[row, : n - 1] = torch.tensor(e.ids[1:])
        embeds = self.modules["embed"](ids).clone()  # media embeddings are written into it
        for row, e in enumerate(batch):
            if e.media is None:
                continue
            kind, start, feed = e.media
            module = self.modules["vision" if kind == "image" else "audio"]
            media = module(*[torch.from_numpy(v) for v in feed.values()])
            media = media.reshape(-1, media.shape[-1])
            embeds[row, start: start + len(media)] = media
            targets[row, start - 1: start - 1 + len(media)] = -100  # placeholders are not predicted
        cfg = self.cfg
        past = [torch.zeros((len(batch), cfg.text.num_key_value_heads, 0, cfg.text.head_dim))
                for _ in range(2 * cfg.text.num_hidden_layers)]
        logits = self.modules["decoder"](embeds, mask, positions, *past)[0]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=-100)

    def peakedness(self, batch: List[Example], chat: ChatTokenizer) -> float:
        """Mean top-1 probability of the next token at each prompt's assistant positions."""
        torch = self.torch
        assistant = chat.ids["<|assistant|>"]
        with torch.no_grad():
            probs = []
            for e in batch:
                ids = torch.tensor([e.ids])
                past = [torch.zeros((1, self.cfg.text.num_key_value_heads, 0, self.cfg.text.head_dim))
                        for _ in range(2 * self.cfg.text.num_hidden_layers)]
                logits = self.modules["decoder"](self.modules["embed"](ids), torch.ones_like(ids),
                                                 torch.from_numpy(e.positions)[None], *past)[0][0]
                start = e.ids.index(assistant) + 1
                probs.append(torch.softmax(logits[start:], -1).max(-1).values.mean().item())
        return float(np.mean(probs))

    def state(self) -> Dict[str, object]:
        """The weights in the checkpoint layout, FP16."""
        out = {}
        for name, prefixes in LAYOUT.items():
            for key, value in self.modules[name].state_dict().items():
                mod_prefix = next(p for p in prefixes if key.startswith(p))
                out[prefixes[mod_prefix] + key[len(mod_prefix):]] = value.detach().to(self.torch.float16).contiguous()
        return out


def train(cfg: BuildConfig, steps: int, seed: int, log=print) -> Tuple[Model, Dict[str, float]]:
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # reductions split by thread count would change the bits
    torch.use_deterministic_algorithms(True)
    chat = ChatTokenizer(tokenizer_for(cfg)[0], cfg.text.vocab_size)
    text, images, clips = examples(cfg, chat)
    model = Model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / max(steps, 1))))
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    loss = float("nan")
    for step in range(steps):
        # every step: all prompts, half of the images and half of the clips (alternating halves)
        pick = [images[i] for i in rng.permutation(len(images))[: len(images) // 2]]
        pick += [clips[i] for i in rng.permutation(len(clips))[: len(clips) // 2]]
        value = model.loss(text) + model.loss(pick)
        optimizer.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss = value.item()
        if step % 25 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps}: loss {loss:.4f} ({time.perf_counter() - started:.0f} s)")
    for module in model.modules.values():
        module.eval()
    stats = {"steps": steps, "final_loss": loss, "seconds": time.perf_counter() - started,
             "top1_probability": model.peakedness(text, chat)}
    return model, stats


def save(model: Model, out: Path, seed: int, steps: int) -> Path:
    """``model.safetensors`` (no timestamp, fixed metadata) and its ``SHA256``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.safetensors"
    save_file(model.state(), str(path), metadata={"format": "pt", "script": "scripts/train_tiny.py",
                                                   "seed": str(seed), "steps": str(steps)})
    canonical_header(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / "SHA256").write_text(f"{digest}  model.safetensors\n")
    return path


def canonical_header(path: Path) -> None:
    """Rewrite the safetensors header with sorted keys: safetensors writes ``__metadata__`` from a
    hash map, in an order that changes from one process to the next. Same length (compact JSON of
    the same content), so the tensor offsets stay."""
    import struct

    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(text) > length:
        raise RuntimeError(f"{path}: canonical header is longer than safetensors' ({len(text)} > {length})")
    data[8: 8 + length] = text.ljust(length)  # safetensors pads its header with spaces too
    path.write_bytes(bytes(data))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("-c", "--config", type=Path, default=CONFIG)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, {"checkpoint": None})  # trained from the seeded random init
    model, stats = train(cfg, args.steps, args.seed, log=lambda m: print(m, file=sys.stderr))
    path = save(model, args.out, args.seed, args.steps)
    stats.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in stats.items()}))


if __name__ == "__main__":
    main()
