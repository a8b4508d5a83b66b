"""Text around the decoder: GLM's chat format, special tokens, and incremental detokenization.

The prompt format is GLM-4.1V's (``[gMASK]<sop>``, ``<|system|>``/``<|user|>``/``<|assistant|>``
turns, images as ``<|begin_of_image|>`` + one ``<|image|>`` per embedding + ``<|end_of_image|>``,
speech likewise with ``<|begin_of_audio|>``/``<|audio|>``). With thinking enabled the assistant
turn opens with ``<think>`` and the model writes its reasoning until it emits ``</think>``; with it
disabled the turn opens with an empty ``<think></think>``, as GLM's own chat templates do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from autoglm_build.errors import UserError

ROLES = ("system", "user", "assistant")
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
SPECIAL = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>",
           "<|begin_of_image|>", "<|image|>", "<|end_of_image|>", "<|begin_of_audio|>", "<|audio|>",
           "<|end_of_audio|>", "<think>", "</think>")
#: GLM's answer tags: special tokens of GLM's tokenizer that the model writes around its answer
#: (``<think>..</think><answer>..</answer>``); sampled like text, never shown in ``content``
ANSWER_TAGS = ("<answer>", "</answer>")
PAIRS = 1 << 16  # two-token decodes ChatTokenizer.decode_two keeps (a few MB of short strings)


@dataclass
class Segment:
    """Part of a prompt: text, or a run of ``count`` media placeholders filled by ``embeds``."""

    text: str = ""
    media: Optional[str] = None  # "image" | "audio"
    embeds: Optional[np.ndarray] = None  # (count, hidden)
    grid: Optional[Tuple[int, int]] = None  # image: (rows, cols) of merged patches
    key: Optional[bytes] = None  # media: a digest of what the embeddings were made from (the prefix cache's key)


@dataclass
class Prompt:
    """Token ids, the media embeddings to splice in, and GLM's 3-part rotary positions."""

    ids: List[int]
    positions: np.ndarray  # (3, len(ids)) int64
    splices: List[Tuple[int, np.ndarray]] = field(default_factory=list)  # (start, (count, hidden))
    thinking: bool = False
    media_keys: List[Optional[bytes]] = field(default_factory=list)  # per splice: its Segment's key

    @property
    def next_position(self) -> int:
        return int(self.positions.max()) + 1 if self.positions.size else 0

    media_tokens: Dict[str, int] = field(default_factory=dict)  # spliced positions by kind


class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` with GLM's special tokens resolved to ids.

    Args:
        tokenizer: the build's tokenizer (``tokenizer_for(cfg)``).
        vocab_size: the decoder's vocabulary (rows of the LM head); ids the tokenizer cannot decode
            (padding rows) are never sampled.
    """

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        missing = [t for t in SPECIAL if tokenizer.token_to_id(t) is None]
        if missing:
            raise UserError(f"tokenizer: special token(s) {', '.join(missing)} missing; not a GLM tokenizer")
        self.ids: Dict[str, int] = {t: tokenizer.token_to_id(t) for t in SPECIAL}
        self.ids.update({t: tokenizer.token_to_id(t) for t in ANSWER_TAGS if tokenizer.token_to_id(t) is not None})
        self.stop_ids = {self.ids[t] for t in STOP_TOKENS}
        decodable = min(vocab_size, tokenizer.get_vocab_size(with_added_tokens=True))
        allowed = np.zeros(vocab_size, dtype=bool)
        allowed[:decodable] = True
        for token in SPECIAL:
            allowed[self.ids[token]] = self.ids[token] in self.stop_ids
        self.allowed = allowed  # the answer tags stay allowed: the model writes them
        self._one: Dict[Tuple[int, bool], str] = {}  # decode_one's texts
        self._two: Dict[Tuple[int, int, bool], str] = {}  # decode_two's

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (``<think>``, ``<answer>``, ...) dropped unless asked for, as vLLM
        does by default (``skip_special_tokens``)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_one(self, token: int, skip_special_tokens: bool = True) -> str:
        """``decode([token], skip_special_tokens)``, remembered (the detokenizer's window before the newest
        token is nearly always one token: this halves its decoder calls)."""
        key = (token, skip_special_tokens)
        text = self._one.get(key)
        if text is None:
            text = self._one[key] = self.decode([token], skip_special_tokens)
        return text

    def decode_two(self, first: int, second: int, skip_special_tokens: bool = True) -> str:
        """``decode([first, second], skip_special_tokens)``, remembered, up to :data:`PAIRS` pairs (then forgotten
        all at once): the detokenizer's window with the newest token is nearly always two tokens, and py-spy on the
        H200's tiny server put ~4 % of its scheduler's decode time in the tokenizer's decode."""
        key = (first, second, skip_special_tokens)
        text = self._two.get(key)
        if text is None:
            if len(self._two) >= PAIRS:
                self._two = {}
            text = self._two[key] = self.decode([first, second], skip_special_tokens)
        return text

    def decode_window(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """``decode(ids, skip_special_tokens)`` of a detokenizer's window: one token and two remembered
        (:meth:`decode_one`, :meth:`decode_two`), longer windows decoded."""
        if len(ids) == 1:
            return self.decode_one(ids[0], skip_special_tokens)
        if len(ids) == 2:
            return self.decode_two(ids[0], ids[1], skip_special_tokens)
        return self.decode(ids, skip_special_tokens)

    # ---- prompts ----------------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[Tuple[str, List[Segment]]], thinking: bool) -> Prompt:
        """GLM's chat format over ``(role, segments)`` turns, ending with an open assistant turn."""
        parts: List[Segment] = [Segment(text="[gMASK]<sop>")]
        for role, segments in messages:
            parts.append(Segment(text=f"<|{role}|>\n"))
            parts += segments
        parts.append(Segment(text="<|assistant|>\n" + ("<think>" if thinking else "<think></think>\n")))
        prompt = self.build(parts)
        prompt.thinking = thinking
        return prompt

    def build(self, parts: Sequence[Segment]) -> Prompt:
        """Ids and positions of text and media segments, in order.

        Text advances all three rotary rows together; an image's ``rows x cols`` embeddings get
        (t, row, col) offsets from the position after the text before it, and the text after it
        continues from the largest position used plus one (transformers' ``Glm4v get_rope_index``).
        Speech embeddings advance like text.
        """
        ids: List[int] = []
        pos: List[np.ndarray] = []
        splices: List[Tuple[int, np.ndarray]] = []
        keys: List[Optional[bytes]] = []
        counts = {"image": 0, "audio": 0}
        cur = 0
        for part in parts:
            if part.media is None:
                new = self.encode(part.text)
                ids += new
                pos.append(np.repeat(np.arange(cur, cur + len(new))[None], 3, axis=0))
                cur += len(new)
                continue
            begin, token, end = {"image": ("<|begin_of_image|>", "<|image|>", "<|end_of_image|>"),
                                 "audio": ("<|begin_of_audio|>", "<|audio|>", "<|end_of_audio|>")}[part.media]
            count = len(part.embeds)
            counts[part.media] += count
            ids.append(self.ids[begin])
            pos.append(np.full((3, 1), cur))
            cur += 1
            splices.append((len(ids), part.embeds))
            keys.append(part.key)
            ids += [self.ids[token]] * count
            if part.media == "image":
                rows, cols = part.grid
                r, c = np.divmod(np.arange(count), cols)
                pos.append(np.stack([np.full(count, cur), cur + r, cur + c]))
                cur += max(rows, cols)
            else:
                pos.append(np.repeat(np.arange(cur, cur + count)[None], 3, axis=0))
                cur += count
            ids.append(self.ids[end])
            pos.append(np.full((3, 1), cur))
            cur += 1
        positions = np.concatenate(pos, axis=1).astype(np.int64) if pos else np.zeros((3, 0), np.int64)
        return Prompt(ids=ids, positions=positions, splices=splices, media_tokens=counts, media_keys=keys)

    def text_prompt(self, text: str) -> Prompt:
        """A raw completion prompt (no chat format): the text's own tokens."""
        return self.build([Segment(text=text)])


class Detokenizer:
    """Text of a growing id list, released in deltas that never split a UTF-8 character.

    vLLM's approach: decode a short window before and after the newest ids and emit the difference,
    holding text back while the decoder's output still ends in a replacement character.
    """

    def __init__(self, tokenizer: ChatTokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: List[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix = self.tokenizer.decode_window(self.ids[self.prefix_offset:self.read_offset], self.skip)
        text = self.tokenizer.decode_window(self.ids[self.prefix_offset:], self.skip)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""


class StopMatcher:
    """Stop strings over streamed text: releases only what cannot be the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, delta: str) -> Tuple[str, bool]:
        """(text safe to release, whether a stop string was hit)."""
        if not self.stops:  # nothing to match or hold back (most requests)
            return delta, False
        self.pending += delta
        for stop in self.stops:
            at = self.pending.find(stop)
            if at >= 0:
                out, self.pending = self.pending[:at], ""
                return out, True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
