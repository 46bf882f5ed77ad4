"""Caption reading and per-step caption processing (kohya sd-scripts semantics).

Reading: captions are decoded leniently (BOM, UTF-16 from Windows Notepad,
CRLF, stray non-UTF-8 bytes) because a caption file that will not decode
should cost the user a warning, not the run.

Processing, per training step, in kohya's order: caption dropout (whole
caption -> ""), then the tags after the first `keep_tokens` are shuffled and
tag-dropped. The trigger word is always present and never dropped or moved
behind shuffled tags, so it keeps meaning what the user trained it to mean.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "CaptionOptions",
    "caption_variants",
    "decode_caption_bytes",
    "is_static",
    "process_caption",
    "split_tags",
]


@dataclass(frozen=True)
class CaptionOptions:
    """Caption processing settings (names follow kohya's where they exist)."""

    shuffle: bool = False  # kohya: shuffle_caption
    keep_tokens: int = 0  # kohya: keep_tokens (first N tags never shuffled/dropped)
    caption_dropout_rate: float = 0.0  # whole caption -> "" with this probability
    tag_dropout_rate: float = 0.0  # kohya: caption_tag_dropout_rate
    trigger_word: str | None = None  # prepended when the caption does not contain it
    separator: str = ","  # kohya: caption_separator

    def __post_init__(self) -> None:
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {self.keep_tokens}")
        for name in ("caption_dropout_rate", "tag_dropout_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {v}")
        if not self.separator.strip():
            raise ValueError("separator must contain a non-space character, e.g. ','")

    @property
    def is_static(self) -> bool:
        return is_static(self)

    def process(self, caption: str | None, rng: random.Random) -> str:
        return process_caption(
            caption,
            shuffle=self.shuffle,
            keep_tokens=self.keep_tokens,
            caption_dropout_rate=self.caption_dropout_rate,
            tag_dropout_rate=self.tag_dropout_rate,
            trigger_word=self.trigger_word,
            separator=self.separator,
            rng=rng,
        )


def options_for(options: CaptionOptions, is_reg: bool) -> CaptionOptions:
    """The caption options of an item. Regularization images keep their captions without the trigger word: the
    trigger marks what the adapter learns, and prior preservation teaches that the prompts without it still draw
    what the base model drew (DreamBooth's class prompt against its instance prompt)."""
    return replace(options, trigger_word=None) if is_reg and options.trigger_word else options


def decode_caption_bytes(data: bytes) -> tuple[str, str | None]:
    """Bytes of a caption file -> (text, warning or None).

    Handles a UTF-8 BOM, UTF-16 with BOM (Notepad's "Unicode"), CRLF and lone
    CR line ends; invalid UTF-8 is decoded with U+FFFD replacements and a
    warning rather than an exception.
    """
    warning = None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError:
            text = data.decode("utf-16", errors="replace")
            warning = "caption file is damaged UTF-16; unreadable characters were replaced with '\ufffd'"
    else:
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            text = data.decode("utf-8", errors="replace")
            warning = (
                f"caption file is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                "undecodable bytes were replaced with '\ufffd' — re-save it as UTF-8"
            )
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return text, warning


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """Tags of a caption: split on the separator, stripped, empty tags removed."""
    return [t.strip() for t in caption.split(separator) if t.strip()]


def _join(tags: list[str], separator: str) -> str:
    return (separator + " ").join(tags) if not separator.endswith(" ") else separator.join(tags)


def _contains_word(caption: str, word: str) -> bool:
    """Trigger already mentioned (as a word, case-insensitive) — e.g. a natural
    language caption "a photo of sks dog" needs no prepended "sks"."""
    return re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", caption, flags=re.IGNORECASE) is not None


def process_caption(
    caption: str | None,
    *,
    shuffle: bool = False,
    keep_tokens: int = 0,
    caption_dropout_rate: float = 0.0,
    tag_dropout_rate: float = 0.0,
    trigger_word: str | None = None,
    separator: str = ",",
    rng: random.Random,
) -> str:
    """Caption for one training step.

    - caption dropout: returns "" (the unconditional caption) with the given rate.
    - the first `keep_tokens` tags stay in place; the rest are shuffled and each
      dropped with `tag_dropout_rate`.
    - the trigger word is prepended when the caption does not mention it, and is
      fixed in front in that case (not counted in keep_tokens). When the caption
      already has it as a tag, that tag is never dropped, and when shuffled it
      goes first among the shuffled tags.
    - with no shuffle and no dropout the caption is returned unchanged (apart
      from the trigger word), so static captions stay byte-identical.
    """
    text = (caption or "").strip()
    trigger = (trigger_word or "").strip()

    # kohya order: whole-caption dropout is decided before any tag work.
    if caption_dropout_rate > 0 and rng.random() < caption_dropout_rate:
        return ""

    prepend = bool(trigger) and not _contains_word(text, trigger)

    if not shuffle and tag_dropout_rate <= 0:
        if prepend:
            return _join([trigger, text], separator) if text else trigger
        return text

    tags = split_tags(text, separator)
    fixed = tags[:keep_tokens]
    flex = tags[keep_tokens:]
    protected_idx = None
    if trigger and not prepend:
        for i, t in enumerate(flex):
            if t.lower() == trigger.lower():
                protected_idx = i
                break
    protected = flex.pop(protected_idx) if protected_idx is not None else None

    if shuffle:
        rng.shuffle(flex)
    if tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= tag_dropout_rate]
    if protected is not None:
        if shuffle:
            flex.insert(0, protected)
        else:  # keep the user's order when only dropping tags
            flex.insert(min(protected_idx, len(flex)), protected)  # type: ignore[arg-type]

    out = fixed + flex
    if prepend:
        out = [trigger] + out
    return _join(out, separator)


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        if isinstance(cfg, Mapping):
            if n in cfg:
                return cfg[n]
        elif hasattr(cfg, n):
            return getattr(cfg, n)
    return default


def is_static(cfg: Any) -> bool:
    """True when every step sees the same caption for an image (no shuffle, no
    caption or tag dropout), so text-encoder outputs can be cached.

    Accepts CaptionOptions, a dict, or any config object, with our names or
    kohya's (shuffle_caption, caption_tag_dropout_rate).
    """
    shuffle = bool(_get(cfg, "shuffle", "shuffle_caption", default=False))
    cdrop = float(_get(cfg, "caption_dropout_rate", default=0.0) or 0.0)
    tdrop = float(_get(cfg, "tag_dropout_rate", "caption_tag_dropout_rate", default=0.0) or 0.0)
    return not shuffle and cdrop <= 0 and tdrop <= 0


def caption_variants(caption: str | None, options: CaptionOptions) -> set[str] | None:
    """Every caption this image can produce, when that set is small and known:
    {caption} when static, {caption, ""} with only caption dropout; None when
    shuffle/tag dropout make it open-ended. Lets the trainer cache text-encoder
    outputs even with caption dropout (kohya refuses that combination)."""
    if options.shuffle or options.tag_dropout_rate > 0:
        return None
    rng = random.Random(0)
    plain = process_caption(
        caption, trigger_word=options.trigger_word, separator=options.separator, rng=rng
    )
    out = {plain}
    if options.caption_dropout_rate > 0:
        out.add("")
    return out
