"""Detokenization deltas and stop strings."""

from __future__ import annotations

from autoglm_build.calibration import tokenizer_for
from autoglm_build.runtime.text import ChatTokenizer, Detokenizer, StopMatcher


def test_detokenizer_deltas_join_to_the_full_decode_and_never_split_characters(tiny_cfg):
    tok = ChatTokenizer(tokenizer_for(tiny_cfg)[0], tiny_cfg.text.vocab_size)
    text = "帮我在美团上点一份宫保鸡丁外卖, then open Settings 🙂"
    ids = tok.encode(text)
    detok = Detokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_matcher_holds_back_possible_prefixes():
    m = StopMatcher(["STOP", "\n\n"])
    assert m.feed("hello S") == ("hello ", False)
    assert m.feed("T") == ("", False)
    assert m.feed("OP and more") == ("", True)
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("ay") == ("STay", False)
    assert m.flush() == ""
    m = StopMatcher(["", ""])  # no stop strings (empty ones are none): every delta as it comes, nothing held
    assert [m.feed(d) for d in ("S", "TOP", "\n\n")] == [("S", False), ("TOP", False), ("\n\n", False)]
    assert m.flush() == ""


def test_generation_never_samples_placeholders_or_undecodable_ids(tiny_cfg):
    tok = ChatTokenizer(tokenizer_for(tiny_cfg)[0], tiny_cfg.text.vocab_size)
    assert not tok.allowed[tok.ids["<|image|>"]] and not tok.allowed[tok.ids["<think>"]]
    assert tok.allowed[tok.ids["<|endoftext|>"]]
    assert not tok.allowed[tok.tokenizer.get_vocab_size():].any()


def test_decode_one_remembers_exactly_what_decode_gives(tiny_cfg):
    tok = ChatTokenizer(tokenizer_for(tiny_cfg)[0], tiny_cfg.text.vocab_size)
    ids = list(range(0, tok.tokenizer.get_vocab_size(with_added_tokens=True), 7)) + sorted(tok.ids.values())
    for skip in (True, False):
        for _ in range(2):  # computed, then remembered
            assert [tok.decode_one(i, skip) for i in ids] == [tok.decode([i], skip) for i in ids]


def test_decode_two_remembers_exactly_what_decode_gives_and_forgets_at_its_bound(tiny_cfg, monkeypatch):
    """Pairs that split a character (a 4-byte emoji over byte tokens), special tokens with and without skipping; past
    PAIRS the memo starts again (bounded memory) and still answers what decode does."""
    from autoglm_build.runtime import text

    tok = ChatTokenizer(tokenizer_for(tiny_cfg)[0], tiny_cfg.text.vocab_size)
    ids = tok.encode("宫保鸡丁 🙂 Settings") + sorted(tok.ids.values())
    pairs = list(zip(ids, ids[1:])) + [(b, a) for a, b in zip(ids, ids[1:])]
    monkeypatch.setattr(text, "PAIRS", 16)
    for skip in (True, False):
        for _ in range(2):
            assert [tok.decode_two(a, b, skip) for a, b in pairs] == [tok.decode([a, b], skip) for a, b in pairs]
    assert len(tok._two) <= 16
