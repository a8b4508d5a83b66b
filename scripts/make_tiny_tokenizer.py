"""Build the tiny config's tokenizer offline (committed as configs/tokenizers/autoglm-phone-tiny.json).

A byte-level BPE (Hugging Face ``tokenizers``) trained on the calibration prompts and transcripts,
with GLM-4.1V's special tokens, so Chinese and English text round-trips. The real model uses its
checkpoint's own tokenizer.json.

    python scripts/make_tiny_tokenizer.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "configs" / "tokenizers" / "autoglm-phone-tiny.json"
SPECIAL = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
           "<|begin_of_image|>", "<|image|>", "<|end_of_image|>", "<|begin_of_audio|>", "<|audio|>",
           "<|end_of_audio|>", "<think>", "</think>"]
VOCAB = 2048  # <= text.vocab_size of the tiny config (4096)
# GLM's answer tags, added after training (ids after the trained vocabulary, so earlier ids stay):
# the phone agent sends its history back as <think>..</think><answer>..</answer> text.
ADDED_SPECIAL = ["<answer>", "</answer>"]


def corpus() -> list:
    data = ROOT / "calibration_data"
    lines = [json.loads(x)["prompt"] for x in (data / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    lines += [json.loads(x)["text"] for x in (data / "audio" / "transcripts.jsonl").read_text().splitlines()]
    return lines


def main() -> None:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(ADDED_SPECIAL)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT))
    print(f"{OUT}: {tok.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
