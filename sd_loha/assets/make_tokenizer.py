"""Build the small CLIP-style BPE tokenizer that the built-in tiny models use.

Real CLIP vocabularies are downloads (49k tokens); tests, the demo and CI must work offline, so we
learn a few hundred BPE merges from a short embedded word list. The files it writes (vocab.json,
merges.txt) follow CLIP's layout exactly, so `CLIPTokenizer.from_pretrained` reads them unchanged.

Run: python -m sd_loha.assets.make_tokenizer   (deterministic; the output is committed)
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

CORPUS = """
a an the of and with in on at by for to from over under small large big tiny photo photograph picture image
painting drawing illustration sketch poster art artwork style render digital oil watercolor ink pencil
portrait landscape still life close up closeup wide shot detailed simple flat bold bright dark light soft
red orange yellow green blue purple pink brown black white gray grey gold silver warm cool pastel vivid
circle circles square squares stripe stripes line lines dot dots triangle shape shapes pattern geometric
abstract background foreground sky cloud clouds sun moon star stars mountain mountains river lake sea ocean
tree trees forest flower flowers grass field city street building house room window door road car
person man woman girl boy child people face hair eyes smile hand dog cat bird horse fish animal
sitting standing walking running looking holding wearing dress shirt hat glasses
masterpiece best quality high quality low quality worst blurry sharp lowres highres cinematic lighting
night day morning evening sunset sunrise rain snow winter summer spring autumn
sdlohastyle sks ohwx trigger token tag tags caption
"""


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode table (the same mapping GPT-2 uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    byte_map = bytes_to_unicode()
    freq = Counter(words)
    # Each word as a tuple of symbols, the last one carrying CLIP's end-of-word marker.
    seqs = {}
    for w, c in freq.items():
        syms = [byte_map[b] for b in w.encode("utf-8")]
        syms[-1] += "</w>"
        seqs[tuple(syms)] = c
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for syms, c in seqs.items():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        # Ties broken by the pair itself so the output never depends on dict order.
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        new = {}
        for syms, c in seqs.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            new[tuple(out)] = c
        seqs = new
    return merges


def build(out_dir: Path, num_merges: int = 600) -> None:
    words = CORPUS.split()
    merges = learn_merges(words, num_merges)
    base = list(bytes_to_unicode().values())
    vocab_list = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for tok in vocab_list:
        vocab.setdefault(tok, len(vocab))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


if __name__ == "__main__":
    build(Path(__file__).parent / "tokenizer")
