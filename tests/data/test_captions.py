from __future__ import annotations

import random

import pytest

from sd_loha.data.captions import CaptionOptions, caption_variants, decode_caption_bytes, is_static, process_caption

CAP = "a, b, c, d, e, f, g, h"


def tags(s: str) -> list[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def test_static_caption_is_unchanged():
    rng = random.Random(0)
    assert process_caption("  red circle,  poster ", rng=rng) == "red circle,  poster"
    assert process_caption(None, rng=rng) == ""


def test_shuffle_keeps_first_keep_tokens():
    seen = set()
    for seed in range(30):
        out = tags(process_caption(CAP, shuffle=True, keep_tokens=2, rng=random.Random(seed)))
        assert out[:2] == ["a", "b"]
        assert sorted(out) == sorted(tags(CAP))
        seen.add(tuple(out))
    assert len(seen) > 5  # really shuffles


def test_tag_dropout_never_drops_kept_tags():
    for seed in range(20):
        out = tags(process_caption(CAP, keep_tokens=3, tag_dropout_rate=0.5, rng=random.Random(seed)))
        assert out[:3] == ["a", "b", "c"]
        assert set(out) <= set(tags(CAP))
    assert tags(process_caption(CAP, keep_tokens=1, tag_dropout_rate=1.0, rng=random.Random(0))) == ["a"]
    # without shuffle, dropout preserves order
    out = tags(process_caption(CAP, tag_dropout_rate=0.4, rng=random.Random(3)))
    assert out == [t for t in tags(CAP) if t in out]


def test_caption_dropout_returns_empty():
    assert process_caption(CAP, caption_dropout_rate=1.0, trigger_word="sks", rng=random.Random(0)) == ""
    n = sum(process_caption(CAP, caption_dropout_rate=0.3, rng=random.Random(s)) == "" for s in range(1000))
    assert 220 < n < 380


def test_trigger_word():
    rng = random.Random(0)
    assert process_caption("red circle", trigger_word="sks", rng=rng) == "sks, red circle"
    assert process_caption("", trigger_word="sks", rng=rng) == "sks"
    assert process_caption(None, trigger_word="sks", rng=rng) == "sks"
    # already there as a tag, or as a word in natural language: not duplicated
    assert process_caption("poster, sks, red", trigger_word="sks", rng=rng) == "poster, sks, red"
    assert process_caption("a photo of SKS dog", trigger_word="sks", rng=rng) == "a photo of SKS dog"
    # "sksx" is not "sks"
    assert process_caption("sksx, red", trigger_word="sks", rng=rng) == "sks, sksx, red"


def test_trigger_is_fixed_and_never_dropped():
    for seed in range(20):
        out = tags(process_caption(CAP, shuffle=True, keep_tokens=1, tag_dropout_rate=0.5, trigger_word="sks", rng=random.Random(seed)))
        assert out[:2] == ["sks", "a"]  # prepended trigger, then keep_tokens
    for seed in range(20):  # trigger present among the tags: survives full tag dropout
        out = tags(process_caption("x, y, sks, z", shuffle=True, tag_dropout_rate=1.0, trigger_word="sks", rng=random.Random(seed)))
        assert out == ["sks"]
    out = tags(process_caption("x, y, sks, z", tag_dropout_rate=1.0, trigger_word="sks", rng=random.Random(0)))
    assert out == ["sks"]


def test_deterministic_given_rng():
    kw = dict(shuffle=True, keep_tokens=1, tag_dropout_rate=0.2, caption_dropout_rate=0.1)
    a = [process_caption(CAP, rng=random.Random(s), **kw) for s in range(10)]
    b = [process_caption(CAP, rng=random.Random(s), **kw) for s in range(10)]
    assert a == b


def test_custom_separator():
    out = process_caption("a| b |c", shuffle=True, keep_tokens=1, separator="|", rng=random.Random(1))
    assert out.startswith("a| ") and sorted(t.strip() for t in out.split("|")) == ["a", "b", "c"]


def test_is_static_and_variants():
    assert is_static(CaptionOptions())
    assert not is_static(CaptionOptions(shuffle=True))
    assert not is_static({"caption_dropout_rate": 0.1})
    assert not is_static({"shuffle_caption": True})  # kohya names
    assert not is_static({"caption_tag_dropout_rate": 0.2})
    assert is_static({"keep_tokens": 3})

    class Cfg:
        shuffle_caption = False
        caption_dropout_rate = 0.0

    assert is_static(Cfg())
    assert CaptionOptions().is_static
    assert caption_variants("red", CaptionOptions(trigger_word="sks")) == {"sks, red"}
    assert caption_variants("red", CaptionOptions(caption_dropout_rate=0.1)) == {"red", ""}
    assert caption_variants("red", CaptionOptions(shuffle=True)) is None


def test_options_validation():
    with pytest.raises(ValueError):
        CaptionOptions(keep_tokens=-1)
    with pytest.raises(ValueError):
        CaptionOptions(tag_dropout_rate=1.5)
    opts = CaptionOptions(shuffle=True, keep_tokens=1)
    assert tags(opts.process(CAP, random.Random(0)))[0] == "a"


def test_decode_caption_bytes():
    assert decode_caption_bytes(b"\xef\xbb\xbfhello") == ("hello", None)
    assert decode_caption_bytes(b"a\r\nb\rc") == ("a\nb\nc", None)
    text, warn = decode_caption_bytes(b"caf\xe9, red")
    assert text == "caf\ufffd, red" and "UTF-8" in warn
    text, warn = decode_caption_bytes("café, rouge".encode("utf-16"))  # Notepad "Unicode"
    assert text == "café, rouge" and warn is None
