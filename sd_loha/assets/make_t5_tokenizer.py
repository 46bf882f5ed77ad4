"""Build the small T5-style Unigram tokenizer that the built-in tiny SD3 model uses.

The real T5 vocabulary (32k SentencePiece pieces) is a download; tests, the demo and CI must work offline, so we
write a Unigram model in T5's layout by hand: <pad> = 0, </s> = 1, <unk> = 2, then one piece per word of
make_tokenizer's word list (``▁word``, scored by its log frequency) and the single printable ASCII characters
(scored far lower, so a known word stays one piece and an unknown one falls back to characters). No training:
the pieces and scores are a pure function of the word list, so the output is the same on every run. It is a
`tokenizers` tokenizer.json with T5's pre-tokenizer (Metaspace), decoder and post-processor (``$A </s>``), which
`T5TokenizerFast.from_pretrained` reads unchanged.

Run: python -m sd_loha.assets.make_t5_tokenizer   (deterministic; the output is committed)
"""

from __future__ import annotations

import json
import math
import string
from collections import Counter
from pathlib import Path

from .make_tokenizer import CORPUS

SPECIAL = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2
SPACE = "▁"  # SentencePiece's word-start marker
CHAR_SCORE = -20.0  # below any word's log frequency: whole words win over spelling them out
MAX_LENGTH = 256  # kohya's t5xxl_max_token_length default; the tiny T5 has no position table to outgrow


def pieces(words: list[str]) -> list[tuple[str, float]]:
    """(piece, score) in id order: the special tokens, the words by falling frequency (ties by the word), the
    word-start marker and the printable characters."""
    counts = Counter(words)
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    out = [(tok, 0.0) for tok in SPECIAL]
    out += [(SPACE + w, math.log(c / total)) for w, c in ranked]
    chars = [SPACE] + [c for c in string.printable if not c.isspace()]
    out += [(c, CHAR_SCORE) for c in chars]
    return out


def build(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram(pieces(CORPUS.split()), unk_id=SPECIAL.index("<unk>"), byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", SPECIAL.index("</s>"))])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    cfg = {"tokenizer_class": "T5Tokenizer", "model_max_length": MAX_LENGTH, "extra_ids": 0,
           "additional_special_tokens": [], **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    build(Path(__file__).parent / "t5_tokenizer")
