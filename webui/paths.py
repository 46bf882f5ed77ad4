"""Which files the web UI may touch.

Every path a user types goes through :class:`PathPolicy`: it is resolved (``~``, ``..`` and symbolic
links included, with :meth:`pathlib.Path.resolve`) and must then lie inside one of the configured
folders: data (training images), models (base models and adapters), outputs (training runs,
generated images), plus the bundled demo images (read-only). Anything else is refused with a
:class:`PathRefused` whose message says what was typed, where it leads and which folders are allowed.

Gradio's own file serving is launched with ``allowed_paths=policy.allowed_paths()`` (exactly these
folders), so the browser cannot fetch anything outside them either.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sd_loha.models import TINY_MODELS

from .defaults import DEFAULT_MODEL

DEMO_IMAGES = (Path(__file__).resolve().parent.parent / "sd_loha" / "assets" / "demo_images").resolve()

#: Files the UI never loads: pickles can run code when they are unpickled.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_ADAPTER_KEY = re.compile(r"(hada_w1_a|lora_down|lokr_w1|\.oft_|lora_A)")


class PathRefused(ValueError):
    """A path the web UI will not use; the message says why in plain words."""


@dataclass(frozen=True)
class Root:
    kind: str  # "data" | "models" | "outputs" | "demo"
    path: Path  # resolved
    writable: bool
    label: str


# What each use of a path may reach (roots by kind), and whether it writes.
USES: dict[str, tuple[tuple[str, ...], bool]] = {
    "dataset": (("data", "demo"), False),
    "model": (("models", "outputs"), False),  # outputs: models merged in the Tools tab
    "vae": (("models",), False),
    "adapter": (("outputs", "models"), False),
    "adapter_edit": (("outputs", "models"), True),  # metadata edited in place
    "output_dir": (("outputs",), True),
    "logging_dir": (("outputs",), True),
    "config_read": (("outputs", "data", "models"), False),
    "config_write": (("outputs", "data", "models"), True),
}


class PathPolicy:
    """The folders the UI may read and write, and the check every typed path goes through."""

    def __init__(self, data_dir: str | os.PathLike = "data", models_dir: str | os.PathLike = "models",
                 outputs_dir: str | os.PathLike = "output", *, demo_images: Path | None = DEMO_IMAGES,
                 create: bool = True) -> None:
        roots = []
        for kind, folder, label in (("data", data_dir, "data"), ("models", models_dir, "models"),
                                    ("outputs", outputs_dir, "outputs")):
            p = Path(folder).expanduser()
            if create:
                p.mkdir(parents=True, exist_ok=True)
            roots.append(Root(kind, p.resolve(), True, label))
        if demo_images is not None and Path(demo_images).is_dir():
            roots.append(Root("demo", Path(demo_images).resolve(), False, "bundled demo images (read-only)"))
        self.roots: tuple[Root, ...] = tuple(roots)

    # ---------------------------------------------------------------- folders

    def root(self, kind: str) -> Path:
        for r in self.roots:
            if r.kind == kind:
                return r.path
        raise KeyError(kind)

    @property
    def data_dir(self) -> Path:
        return self.root("data")

    @property
    def models_dir(self) -> Path:
        return self.root("models")

    @property
    def outputs_dir(self) -> Path:
        return self.root("outputs")

    def allowed_paths(self) -> list[str]:
        """For gradio's launch(allowed_paths=...): exactly the configured folders."""
        return [str(r.path) for r in self.roots]

    def describe(self) -> str:
        return " · ".join(f"{r.label}: `{r.path}`" for r in self.roots)

    def _roots_for(self, use: str) -> list[Root]:
        kinds, write = USES[use]
        return [r for k in kinds for r in self.roots if r.kind == k and (r.writable or not write)]

    def inside(self, path: str | os.PathLike, use: str | None = None) -> bool:
        """True when the resolved path lies in one of the allowed folders (of `use`, if given)."""
        p = Path(path).resolve()
        roots = self._roots_for(use) if use else self.roots
        return any(p == r.path or p.is_relative_to(r.path) for r in roots)

    # ---------------------------------------------------------------- the check

    def resolve(self, text: str | os.PathLike | None, use: str, *, must_exist: bool = False, what: str | None = None) -> Path:
        """The resolved path for `text`, or PathRefused.

        A relative path is tried against the current folder first (as the command line reads it), then
        against each allowed folder of this use (so "my_style" in the dataset box means data/my_style)."""
        what = what or use.replace("_", " ")
        raw = "" if text is None else str(text).strip()
        if not raw:
            raise PathRefused(f"{what}: no path given")
        if "\x00" in raw:
            raise PathRefused(f"{what}: the path contains a NUL character")
        roots = self._roots_for(use)
        allowed = ", ".join(f"{r.label} ({r.path})" for r in roots)
        given = Path(raw).expanduser()
        if given.is_absolute():
            candidates = [given]
        else:
            candidates = [Path.cwd() / given] + [r.path / given for r in roots]
        pairs: list[tuple[Path, Path]] = []
        for c in candidates:
            try:
                pairs.append((c, c.resolve()))
            except (OSError, RuntimeError) as e:  # symlink loop
                raise PathRefused(f"{what} '{raw}' cannot be resolved ({e})") from None

        def ok(p: Path) -> bool:
            return any(p == r.path or p.is_relative_to(r.path) for r in roots)

        def refuse(c: Path, where: Path) -> PathRefused:
            link = " (through a symbolic link)" if any(q.is_symlink() for q in _parents_within(c)) else ""
            return PathRefused(
                f"{what} '{raw}' is refused: it leads to {where}{link}, which is outside the folders this web UI "
                f"may use. Allowed for the {what}: {allowed}. Move or copy the files into one of those folders "
                "(a link that points outside is refused too), or restart the UI with other --data-dir/--models-dir/"
                "--outputs-dir folders."
            )

        inside = [r for _, r in pairs if ok(r)]
        for r in inside:  # an existing file or folder inside the allowed folders wins
            if r.exists():
                return r
        outside = [(c, r) for c, r in pairs if not ok(r) and (c.exists() or c.is_symlink())]
        if outside and (must_exist or not inside):
            raise refuse(*outside[0])
        if not inside:
            raise refuse(*pairs[0])
        if must_exist:
            raise PathRefused(f"{what} '{raw}' not found (looked for {', '.join(str(p) for p in inside)})")
        return inside[0]

    # ---------------------------------------------------------------- kinds of files

    def check_model(self, text: str | None, what: str = "base model") -> str:
        """A base model the UI may load: a built-in tiny name, a hub id (org/name), or a .safetensors file or
        diffusers folder inside the models folder. Returns what to pass to the library."""
        raw = (text or "").strip()
        if not raw:
            raise PathRefused(f"{what}: none given; choose {', '.join(TINY_MODELS)}, a model in {self.models_dir}, "
                              "or a Hugging Face id (org/name)")
        if raw in TINY_MODELS:
            return raw
        _refuse_pickle(raw, what)
        looks_hub = bool(_HUB_ID.fullmatch(raw)) and ".." not in raw and not raw.lower().endswith(".safetensors")
        try:
            p = self.resolve(raw, "model", must_exist=True, what=what)
        except PathRefused:
            exists_somewhere = any(c.exists() for c in (Path(raw).expanduser(), *(r.path / raw for r in self._roots_for("model"))))
            if looks_hub and not exists_somewhere:
                return raw  # a hub id: downloaded into the Hugging Face cache, not a path the user picks
            raise
        if p.is_dir():
            if not (p / "model_index.json").is_file():
                raise PathRefused(f"{what} '{raw}' is a folder without model_index.json: choose a diffusers model folder "
                                  "or a .safetensors checkpoint")
            return str(p)
        if p.suffix.lower() != ".safetensors":
            raise PathRefused(f"{what} '{raw}': the web UI loads only .safetensors checkpoints and diffusers folders")
        return str(p)

    def check_adapter(self, text: str | None, what: str = "LoHA file", *, edit: bool = False) -> Path:
        """An adapter .safetensors file in the outputs or models folder (`edit`: one the UI may rewrite)."""
        raw = (text or "").strip()
        _refuse_pickle(raw, what)
        p = self.resolve(raw, "adapter_edit" if edit else "adapter", must_exist=True, what=what)
        if not p.is_file():
            raise PathRefused(f"{what} '{raw}' is a folder, not a file")
        if p.suffix.lower() != ".safetensors":
            raise PathRefused(f"{what} '{raw}': the web UI loads only .safetensors adapter files")
        return p

    def check_peft_folder(self, text: str | None, what: str = "PEFT adapter") -> Path:
        """A PEFT adapter (a folder with adapter_config.json, or its adapter_model.safetensors) in the outputs or
        models folder."""
        from sd_loha.peft_format import is_peft_adapter

        raw = (text or "").strip()
        _refuse_pickle(raw, what)
        p = self.resolve(raw, "adapter", must_exist=True, what=what)
        if not is_peft_adapter(p):
            raise PathRefused(f"{what} '{raw}' is not a PEFT adapter: choose a folder holding adapter_config.json and "
                              "adapter_model.safetensors (or a pipeline folder of such folders)")
        return p

    def output_path(self, text: str | None, what: str = "output") -> Path:
        """Where to write a new file or folder: a relative name means inside the outputs folder; anything that
        leads elsewhere is refused. Pickle suffixes are refused too."""
        raw = (text or "").strip()
        if not raw:
            raise PathRefused(f"{what}: no name given; type a name such as my_model.safetensors")
        _refuse_pickle(raw, what)
        given = Path(raw).expanduser()
        return self.resolve(given if given.is_absolute() else self.outputs_dir / given, "output_dir", what=what)

    # ---------------------------------------------------------------- listings for dropdowns

    def adapter_files(self, limit: int = 500) -> list[str]:
        """Adapter .safetensors files under the outputs and models folders, newest first."""
        found = [p for r in self._roots_for("adapter") for p in _walk(r.path, ".safetensors") if is_adapter_file(p)]
        found.sort(key=lambda p: (-p.stat().st_mtime, str(p)))
        return [str(p) for p in found[:limit]]

    def model_choices(self) -> list[str]:
        """Built-in models (the default first), diffusers folders and .safetensors checkpoints under the models
        folder, then those under the outputs folder (merged in the Tools tab)."""
        out = [DEFAULT_MODEL, *(m for m in TINY_MODELS if m != DEFAULT_MODEL)]
        for root in (r.path for r in self._roots_for("model")):
            for index in sorted(root.glob("*/model_index.json")) + sorted(root.glob("*/*/model_index.json")):
                out.append(str(index.parent.resolve()))
            for p in _walk(root, ".safetensors"):
                if not is_adapter_file(p) and not any(part.startswith("state-") for part in p.parts):
                    out.append(str(p))
        return out

    def dataset_choices(self) -> list[str]:
        out = [str(p.resolve()) for p in sorted(self.data_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        if any(r.kind == "demo" for r in self.roots):
            out.append(str(self.root("demo")))
        return out


def _parents_within(p: Path) -> Iterable[Path]:
    cur = p
    while cur != cur.parent:
        yield cur
        cur = cur.parent


def _refuse_pickle(raw: str, what: str) -> None:
    if raw.lower().endswith(PICKLE_SUFFIXES):
        raise PathRefused(f"{what} '{raw}' is refused: the web UI does not open {', '.join(PICKLE_SUFFIXES)} files "
                          "(pickle files can run code when loaded). Use a .safetensors file or a diffusers folder.")


def _walk(root: Path, suffix: str, max_depth: int = 4) -> list[Path]:
    """Files with `suffix` under root (not following links out of it; skipping hidden and state folders)."""
    out: list[Path] = []
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if not n.startswith((".", "state-")) and len(d.parts) - base_depth < max_depth]
        for name in filenames:
            if name.lower().endswith(suffix):
                p = (d / name)
                try:
                    rp = p.resolve()
                except OSError:
                    continue
                if rp.is_relative_to(root) and rp.is_file():
                    out.append(rp)
    return out


def is_adapter_file(path: Path) -> bool:
    """Whether a .safetensors file holds adapter (LoHA/LoRA/...) weights, from its header alone."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 50_000_000:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return False
    return any(_ADAPTER_KEY.search(k) for k in header if k != "__metadata__")


def loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def split_list(text: str | Sequence[str] | None) -> list[str]:
    if text is None:
        return []
    if not isinstance(text, str):
        return [t for t in text if t]
    return [t.strip() for t in re.split(r"[,\n]", text) if t.strip()]
