"""Train tab: dataset preflight, the common options as fields, the rest as TOML, Start/Stop/Resume, live view.

The settings are a :class:`~sd_loha.train.config.TrainConfig` built by the library's own parser: the TOML box
is read as a ``--config`` file is (same checks, same messages), the fields are a layer over it, and Save
writes ``TrainConfig.to_toml()``, so a file saved here trains identically with ``sd-loha train --config FILE``
(paths are written resolved and absolute), and any CLI config loads here. All the training itself is
``sd_loha.train.loop.train`` in the background runner (webui/runner.py).
"""


import html
import json
import math
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sd_loha.atomic import write_atomic
from sd_loha.targets import is_preset_file
from sd_loha.train.checks import check_output_dir, check_paths
from sd_loha.train.config import (
    GROUP_TITLES,
    GROUPS,
    OPTIONS,
    ConfigError,
    TrainConfig,
    parse_option_text,  # a "toml" widget's text reads as --set NAME=TEXT does
    toml_value,  # the TOML writer of TrainConfig.to_toml
    config_from_layers,
)
from sd_loha.train.prompts import is_prompts_file

from .defaults import (
    DEFAULT_GUIDANCE,
    DEFAULT_MODEL,
    DEFAULT_PROMPTS,
    DEFAULT_SAMPLER,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
)
from .paths import PathPolicy, PathRefused
from .runner import RunActive, TrainingRunner, describe_error

# Form fields in display order: option name -> label. Each is the option of that name (its widget follows the
# option's kind in OPTIONS), except "length_unit" and "length", which stand for max_train_steps / max_train_epochs.
FIELDS: dict[str, str] = {
    "pretrained_model": "Base model (built-in toy-sd1 / tiny-*, .safetensors / diffusers folder in the models folder, or hub id)",
    "train_data_dir": "Dataset folder (inside the data folder)",
    "output_dir": "Output folder (inside the outputs folder)",
    "output_name": "Output name (file name stem)",
    "overwrite": "Overwrite this output name's earlier files",
    "preset": "Preset (or a LyCORIS preset .toml file)",
    "network_dim": "Rank",
    "network_alpha": "Alpha",
    "conv_dim": "Conv rank (0 = no k×k convs)",
    "conv_alpha": "Conv alpha",
    "train_text_encoder": "Train the text encoder(s) too",
    "learning_rate": "Learning rate",
    "unet_lr": "UNet / SD 3.x transformer LR (empty = learning rate)",
    "text_encoder_lr": "Text encoder LR (empty = learning rate)",
    "length_unit": "Run length in",
    "length": "Steps / epochs",
    "resolution": "Resolution (512, or W,H)",
    "train_batch_size": "Batch size",
    "lr_scheduler": "LR schedule",
    "seed": "Seed",
    "save_every_n_steps": "Save every N steps (0 = only at the end)",
    "sample_prompts": "Sample prompts (one per line, each with kohya's --n --w --h --d --l --s options; or a prompts "
                      "file .txt / .toml / .json; empty = no samples)",
    "sample_every_n_steps": "Sample every N steps (0 = only at the end)",
    "sample_steps": "Sample denoising steps",
}
FIELD_NAMES = list(FIELDS)
LENGTH_FIELDS = {"length_unit": "unit", "length": "int"}
LENGTH_OPTIONS = ("max_train_steps", "max_train_epochs")  # the options the two length fields stand for
# Option kind -> widget kind. An optional int/float/bool gets "opt" in front (empty or "not set" = not set). A kind
# not listed, such as one added to config.py later, is "toml": a text holding the value as --set NAME=TEXT takes it
# (a TOML value: [0, 0.5, 1], { weight_decay = 0.01 }; or kohya's "pattern=value,..." strings).
_WIDGETS = {"bool": "bool", "int": "int", "float": "float", "warmup": "float", "path": "text", "str": "text",
            "optimizer": "text", "enum": "choice", "list": "lines", "resolution": "resolution"}
NOT_SET = "not set"  # the optional booleans' third choice
DEMO_TOML = Path(__file__).resolve().parent.parent / "train_configs" / "demo.toml"
TOML_BOX, FORM = "TOML box", "fields"  # the names problems are reported under
# A fresh page's settings, over TrainConfig's defaults: the pretrained built-in base at the one size it draws, with
# buckets that reach down to it (the default min_bucket_reso, 256, refuses a 64 px resolution), and samples of its
# captions, drawn as its model card draws them, at the end of the run. Options without a field start in the TOML box
# (and in their section's widgets).
START: dict[str, Any] = {
    "pretrained_model": DEFAULT_MODEL, "output_name": "my_loha", "resolution": (DEFAULT_SIZE, DEFAULT_SIZE),
    "min_bucket_reso": DEFAULT_SIZE, "sample_prompts": list(DEFAULT_PROMPTS), "sample_steps": DEFAULT_STEPS,
    "sample_guidance_scale": DEFAULT_GUIDANCE, "sample_sampler": DEFAULT_SAMPLER,
}


def field_kind(name: str) -> str:
    """The widget kind of a field or an option, from the option's kind."""
    if name in LENGTH_FIELDS:
        return LENGTH_FIELDS[name]
    if name == "pretrained_model":
        return "model"  # a dropdown of the models the UI may load, custom values allowed
    spec = OPTIONS[name]
    kind = _WIDGETS.get(spec.kind, "toml")
    return "opt" + kind if spec.optional and kind in ("int", "float", "bool") else kind


def section_options() -> dict[str, list[str]]:
    """The generated "All options" sections: table (group) -> the options without a field above, in the table's
    order. Read from OPTIONS on every call, so an option added to config.py gets a widget with no UI change."""
    covered = {*FIELDS, *LENGTH_OPTIONS}
    out: dict[str, list[str]] = {}
    for name, spec in OPTIONS.items():
        if name not in covered:
            out.setdefault(spec.group, []).append(name)
    return {g: out[g] for g in [*GROUPS, *out] if g in out}


def section_names() -> list[str]:
    return [n for names in section_options().values() for n in names]


def form_names() -> list[str]:
    """Every widget of the settings: the fields, then the sections' options."""
    return FIELD_NAMES + section_names()


def option_info(name: str) -> str:
    """A section widget's info line: the option's help, its range and its default (as docs/config.md says them)."""
    spec = OPTIONS[name]
    parts = [spec.help]
    if spec.range_text():
        parts.append(f"Range: {spec.range_text()}.")
    default = spec.default_doc or (NOT_SET if spec.default is None else toml_value(spec.default))
    parts.append(f"Default: {default.strip('`')}.")
    if field_kind(name) == "toml":
        parts.append(f"Written as in TOML, e.g. {spec.example_value()}.")
    return " ".join(parts)


def _zero_is_legal(name: str) -> bool:
    spec = OPTIONS[name]
    return spec.min is None or spec.min < 0 or (spec.min == 0 and not spec.min_open)


def to_widget(name: str, value: Any) -> Any:
    """An option's value as its widget shows it (None: an empty widget, "not set")."""
    kind = field_kind(name)
    if kind == "resolution":
        w, h = value
        return str(w) if w == h else f"{w},{h}"
    if kind == "lines":
        return "\n".join(value)
    if kind == "optbool":
        return NOT_SET if value is None else str(value).lower()
    if kind == "toml":
        return "" if value is None else toml_value(value)
    if value is None:
        return "" if kind in ("text", "model") else None
    return value


def from_widget(name: str, value: Any) -> Any:
    """A widget's value as the option's value for the parser (None = not set; wrong values stay for its error)."""
    kind = field_kind(name)
    if kind in ("int", "optint", "float", "optfloat"):
        if value is None or value == "":
            return None
        if kind in ("int", "optint") and float(value).is_integer():
            value = int(value)  # the browser sends 8.0; 8.5 stays for the error
        # an optional number reads 0 as not set where 0 is no legal value ("save every 0 steps" = never)
        return None if kind.startswith("opt") and value == 0 and not _zero_is_legal(name) else value
    if kind == "optbool":
        return {"true": True, "false": False}.get(str(value).strip().lower())
    if kind == "lines":
        return [line.strip() for line in (value or "").splitlines() if line.strip()]
    if kind == "toml":
        text = (value or "").strip()
        return parse_option_text(OPTIONS[name], text) if text else None  # the --set parser
    if kind in ("text", "model", "resolution", "choice"):
        return (value or "").strip() or None
    return value


# How each path option is checked against the folders the UI may use; the value is replaced by the resolved
# path. Every option of kind "path" must be here (tests/webui/test_train_tab.py checks it).
PATH_CHECKS: dict[str, Callable[[PathPolicy, str], str]] = {
    "pretrained_model": lambda policy, v: policy.check_model(v),
    "vae": lambda policy, v: policy.check_model(v, what="VAE"),
    "base_config": lambda policy, v: policy.check_model(v, what="base_config"),
    "network_weights": lambda policy, v: str(policy.check_adapter(v, what="network_weights")),
    "train_data_dir": lambda policy, v: str(policy.resolve(v, "dataset", what="train_data_dir")),
    "reg_data_dir": lambda policy, v: str(policy.resolve(v, "dataset", what="reg_data_dir")),
    "conditioning_data_dir": lambda policy, v: str(policy.resolve(v, "dataset", what="conditioning_data_dir")),
    "output_dir": lambda policy, v: str(policy.resolve(v, "output_dir", what="output_dir")),
    "logging_dir": lambda policy, v: str(policy.resolve(v, "logging_dir", what="logging_dir")),
}


def _config_file(policy: PathPolicy, value: str, what: str) -> str:
    return str(policy.resolve(value, "config_read", what=what))


def _prompt_files(policy: PathPolicy, value: Any) -> Any:
    if not isinstance(value, (str, list)):
        return value  # not a list of strings: the parser says so
    entries = [value] if isinstance(value, str) else value
    return [_config_file(policy, e, "sample prompts file") if isinstance(e, str) and is_prompts_file(e) else e
            for e in entries]


# Files the config check itself reads (a preset file, prompts files): checked against the folders before it reads
# them, on the raw value the layers end with, which is replaced by the resolved path. Every option that takes a
# file (OptionSpec.file_suffix) must be here (tests/webui/test_train_tab.py checks it).
READ_FILE_CHECKS: dict[str, Callable[[PathPolicy, Any], Any]] = {
    "preset": lambda policy, v: (_config_file(policy, v, "preset file") if isinstance(v, str) and is_preset_file(v)
                                 else v),
    "sample_prompts": _prompt_files,
}


# ---------------------------------------------------------------------------------------------------
# settings <-> form <-> TOML (no gradio here: unit-testable)
# ---------------------------------------------------------------------------------------------------


def start_config(policy: PathPolicy) -> TrainConfig:
    """TrainConfig's defaults with START over them, writing into outputs/my_loha (no dataset chosen yet)."""
    cfg = TrainConfig()
    for name, value in {**START, "output_dir": str(policy.outputs_dir / START["output_name"])}.items():
        setattr(cfg, name, value)
    return cfg


def default_form(policy: PathPolicy) -> dict[str, Any]:
    """The fields and section widgets of a fresh page (with start_toml() in the TOML box)."""
    return config_to_form(start_config(policy))


def start_toml() -> str:
    """The TOML box of a fresh page: the options of START that have no field."""
    tables: dict[str, list[str]] = {}
    for name, value in START.items():
        if name not in FIELDS:  # JSON's numbers, strings and booleans are TOML's
            tables.setdefault(OPTIONS[name].group, []).append(f"{name} = {json.dumps(value)}")
    return "\n".join(f"[{table}]\n" + "\n".join(lines) + "\n" for table, lines in tables.items())


def demo_config(policy: PathPolicy) -> TrainConfig | None:
    """train_configs/demo.toml (its base model on the bundled images) with the dataset and output folders of this
    UI."""
    if not DEMO_TOML.is_file():
        return None
    data = policy.data_dir / "demo"
    folders = {"train_data_dir": str(data if data.is_dir() else policy.root("demo")),
               "output_dir": str(policy.outputs_dir / "demo")}
    return config_from_layers([(DEMO_TOML.read_text(encoding="utf-8"), str(DEMO_TOML)), (folders, "web UI")])


def config_to_form(cfg: TrainConfig) -> dict[str, Any]:
    """Every widget's value (fields and sections) for a config."""
    f = {name: to_widget(name, getattr(cfg, name)) for name in form_names() if name not in LENGTH_FIELDS}
    if cfg.max_train_epochs:
        f["length_unit"], f["length"] = "epochs", cfg.max_train_epochs
    else:
        f["length_unit"], f["length"] = "steps", cfg.max_train_steps
    return f


def _form_values(form: dict[str, Any]) -> dict[str, Any]:
    """The widgets as option values (None = not set), for the layer over the TOML box."""
    out = {name: from_widget(name, v) for name, v in form.items() if name in OPTIONS}
    if "length" in form:
        n = form.get("length")
        n = int(n) if n not in (None, "") else None
        if form.get("length_unit") == "epochs":
            out["max_train_epochs"], out["max_train_steps"] = n, None
        else:
            out["max_train_steps"], out["max_train_epochs"] = n, None
    return out


def _toml_tables(text: str | None) -> dict[str, tuple[str | None, Any]] | None:
    """The options a TOML text sets: name -> (its table, or None at the top, value); None if it is not TOML (the
    box's own layer reports that)."""
    try:
        data = tomllib.loads(text or "")
    except tomllib.TOMLDecodeError:
        return None
    out: dict[str, tuple[str | None, Any]] = {}
    for key, value in data.items():
        if key in GROUPS and isinstance(value, dict):
            out.update({k: (key, v) for k, v in value.items() if k in OPTIONS})
        elif key in OPTIONS:
            out[key] = (None, value)
    return out


def box_edits(toml_text: str, synced: str) -> dict[str, Any]:
    """The options typed into the TOML box since the page last wrote it (`synced`: the text it wrote, which the
    widgets showed too), in their tables. They are the newest settings, so they win over the widgets; an option
    deleted from the box is no edit (its widget keeps it)."""
    now, before = _toml_tables(toml_text), _toml_tables(synced) or {}
    edits: dict[str, Any] = {}
    for name, (table, value) in (now or {}).items():
        if name not in before or before[name][1] != value:
            (edits.setdefault(table, {}) if table else edits)[name] = value
    return edits


def _layers(form: dict[str, Any], toml_text: str, synced: str | None) -> list[tuple[str | dict[str, Any], str]]:
    """The TOML box read as a --config file, the widgets over it (as --set is over the file), and, from the page
    (`synced` given), the box's own edits over those."""
    layers: list[tuple[str | dict[str, Any], str]] = [(toml_text or "", TOML_BOX), (_form_values(form), FORM)]
    edits = box_edits(toml_text, synced) if synced is not None else {}
    return layers + [(edits, TOML_BOX)] if edits else layers


def _flat(layer: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(layer, str):
        return {k: v for k, (_, v) in (_toml_tables(layer) or {}).items()}
    out: dict[str, Any] = {}
    for key, value in layer.items():
        out.update({k: v for k, v in value.items()} if key in GROUPS and isinstance(value, dict) else {key: value})
    return out


def _read_file_checked(policy: PathPolicy, layers: list[tuple[str | dict[str, Any], str]]
                       ) -> list[tuple[str | dict[str, Any], str]]:
    """The layers with each file that the config check reads (READ_FILE_CHECKS) checked against the policy first
    and given resolved, as a layer of the same name over the one that set it."""
    problems: list[str] = []
    extra: list[tuple[str | dict[str, Any], str]] = []
    for name, check in READ_FILE_CHECKS.items():
        value, source = None, ""
        for layer, src in layers:  # the value the merge ends with: the last layer's, None unsets
            flat = _flat(layer)
            if name in flat:
                value, source = flat[name], src
        if value is None:
            continue
        try:
            resolved = check(policy, value)
        except PathRefused as e:
            problems.append(str(e))
            continue
        if resolved != value:
            extra.append(({name: resolved}, source))
    if problems:
        raise ConfigError(problems, header="paths refused")
    return layers + extra


def _checked_config(policy: PathPolicy, layers: list[tuple[str | dict[str, Any], str]]) -> TrainConfig:
    return config_from_layers(_read_file_checked(policy, layers))


def build_config(policy: PathPolicy, form: dict[str, Any], toml_text: str = "", synced: str | None = None
                 ) -> TrainConfig:
    """The TrainConfig of the TOML box overridden by the widgets (and, with `synced`, by the box's edits since the
    page wrote it: box_edits), every path checked against the policy and written resolved (absolute), so the
    saved TOML trains the same from any working folder."""
    cfg = _checked_config(policy, _layers(form, toml_text, synced))
    problems = []
    for name, check in PATH_CHECKS.items():
        value = getattr(cfg, name)
        if not value:
            continue
        try:
            setattr(cfg, name, check(policy, value))
        except PathRefused as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(problems, header="paths refused")
    return cfg


def toml_box_config(policy: PathPolicy, toml_text: str) -> TrainConfig:
    """The TOML box alone (for "Apply TOML to the form"); the options every run needs default to the UI's
    folders and the default model when the box leaves them out."""
    needed = {"pretrained_model": DEFAULT_MODEL, "train_data_dir": str(policy.data_dir),
              "output_dir": str(policy.outputs_dir)}
    return _checked_config(policy, [(needed, "base settings"), (toml_text or "", TOML_BOX)])


def file_config(policy: PathPolicy, path: Path) -> TrainConfig:
    """A config file inside the allowed folders, read as --config reads it, its preset and prompts files checked
    against the policy before the config check reads them."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read it as UTF-8 text ({e})"], header="cannot load") from None
    return _checked_config(policy, [(text, str(path))])


def dataset_escapes(policy: PathPolicy, folder: Path, limit: int = 5) -> list[str]:
    """Files or folders in the dataset that are links leading outside the allowed folders."""
    bad: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink() and not policy.inside(p, "dataset"):
                bad.append(f"{p.relative_to(folder)} -> {os.readlink(p)}")
                if len(bad) >= limit:
                    return bad
    return bad


def preflight_report(policy: PathPolicy, form: dict[str, Any], toml_text: str = "", synced: str | None = None):
    """Run the dataset preflight with the form's dataset settings; returns the PreflightReport."""
    from sd_loha.train.checks import config_preflight

    # The dataset check needs neither a base model nor an output folder: stand-ins satisfy the validation.
    stand_ins = {"pretrained_model": DEFAULT_MODEL, "output_dir": str(policy.outputs_dir)}
    cfg = _checked_config(policy, [*_layers(form, toml_text, synced), (stand_ins, "dataset check")])
    folder = policy.resolve(cfg.train_data_dir, "dataset", must_exist=True, what="dataset folder")
    escapes = dataset_escapes(policy, folder)
    if escapes:
        raise PathRefused(f"the dataset folder holds links that lead outside the allowed folders: {', '.join(escapes)}")
    return config_preflight(cfg, folder=folder)


def preflight_markdown(report) -> str:
    """The preflight as Markdown; `report` is a PreflightReport or its to_dict()."""
    d = report if isinstance(report, dict) else report.to_dict()
    cap = d["captions"]
    lines = [
        f"**{d['images_found']} images found, {d['images_used']} used, {len(d['skipped'])} skipped**"
        + (f", {d['validation_images']} held out for validation" if d["validation_images"] else "")
        + f" · {d['steps_per_epoch']} steps per epoch at batch size {d['batch_size']}",
        "",
        f"Captions: {cap.get('file', 0)} from caption files, {cap.get('metadata', 0)} from metadata.jsonl, "
        f"{cap.get('folder', 0)} from folder names, **{cap.get('missing', 0)} missing**"
        + (f" (trained with {d['missing_caption_fallback']})" if cap.get("missing") else ""),
        "",
        "| bucket (W×H) | images | samples | batches |",
        "|---|---:|---:|---:|",
    ]
    for b in d["buckets"]:
        flag = " ⚠ fewer than the batch size" if b["smaller_than_batch"] else ""
        lines.append(f"| {b['width']}×{b['height']}{flag} | {b['images']} | {b['samples']} | {b['batches']} |")
    if d["skipped"]:
        lines += ["", "**Skipped files**", "", "| file | reason |", "|---|---|"]
        for s in d["skipped"][:30]:
            lines.append(f"| `{s['path']}` | {s['reason'].replace('|', '/')} |")
        if len(d["skipped"]) > 30:
            lines.append(f"| … | {len(d['skipped']) - 30} more |")
    if d["warnings"]:
        lines += ["", "**Warnings**", ""] + [f"- {w}" for w in d["warnings"]]
    return "\n".join(lines)


def preflight_thumbnails(report, n: int = 8) -> list[tuple[str, str]]:
    if isinstance(report, dict):
        root = Path(report["train_data_dir"])
        return [(str(root / it["path"]), (it["caption"] or "(no caption)")[:120]) for it in report["items"][:n]]
    return [(str(it.path), (it.caption or "(no caption)")[:120]) for it in report.items[:n]]


def _fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def status_html(snap: dict[str, Any]) -> str:
    st, step, total = snap["status"], snap["step"], snap["total"]
    frac = step / total if total else 0.0
    if st == "finished":
        frac = 1.0
    parts = [f"<b>{html.escape(snap['message'])}</b>"]
    if total:
        parts.append(f"step {step} / {total}")
    if snap.get("epoch"):
        parts.append(f"epoch {snap['epoch']}")
    if snap.get("it_s"):
        parts.append(f"{snap['it_s']:.2f} it/s")
    if snap.get("eta_s") is not None and st in ("training", "stopping") and total:
        parts.append(f"ETA {_fmt_time(snap['eta_s'])}")
    if snap.get("loss") is not None:
        parts.append(f"loss {snap['loss']:.4f}")
    if snap.get("memory_total"):
        gib = snap["memory_total"] / 2 ** 30
        parts.append(f"needs about {gib:.1f} GiB" + (" (more than the GPU has free)" if snap.get("memory_fits") is False
                                                     else ""))
    return (
        f'<div class="sdl-status" data-status="{st}" data-step="{step}" data-total="{total}">'
        f'<div class="sdl-bar"><div class="sdl-fill sdl-{st}" style="width:{100 * frac:.1f}%"></div></div>'
        f'<div class="sdl-line">{" · ".join(parts)}</div></div>'
    )


def result_markdown(snap: dict[str, Any]) -> str:
    st = snap["status"]
    if st == "failed":
        return f"### Training failed\n\n```text\n{snap['error']}\n```"
    if st in ("finished", "stopped") and snap.get("output"):
        out = Path(snap["output"])
        lines = [f"### {'Finished' if st == 'finished' else 'Stopped'}",
                 f"Adapter file: **{out.name}**  ", f"in `{out.parent}`"]
        if st == "stopped":
            lines.append("\nA resumable state was saved: press **Resume** (same settings) to continue.")
        earlier = [p for p in snap.get("saved", []) if p != snap["output"]]
        if earlier:
            lines.append("\nIntermediate saves: " + ", ".join(f"`{Path(p).name}`" for p in earlier[-6:]))
        if snap.get("loss_curve"):
            lines.append(f"\nLoss curve: `{snap['loss_curve']}`")
        return "\n".join(lines)
    if snap["active"]:
        text = f"Running, writing to `{snap.get('output_dir') or '?'}`"
        if snap.get("memory_fits") is False:  # say it while there is time to stop and change the settings
            text += f"\n\n**The run may not fit in the GPU's memory:**\n\n```text\n{snap['memory']}\n```"
        return text
    return ""


def loss_frame(snap: dict[str, Any]):
    """Loss, its moving average and the validation loss, long format for gr.LinePlot (None before step 1).

    Every series is present from the first frame on (validation as an empty NaN point until it has values):
    the plot fixes its colour legend from the first data it gets and does not draw series that come later."""
    import pandas as pd

    losses = snap["losses"]
    if not losses:
        return None
    w = max(2, len(losses) // 20)
    vals = [v for _, v in losses]
    avg, acc = [], 0.0
    for i, v in enumerate(vals):
        acc += v - (vals[i - w] if i >= w else 0.0)
        avg.append(acc / min(i + 1, w))
    stride = max(1, len(losses) // 1000)  # long runs: at most ~1000 points per series go to the browser
    keep = list(range(0, len(losses), stride))
    if keep[-1] != len(losses) - 1:
        keep.append(len(losses) - 1)
    rows = [(losses[i][0], vals[i], "training loss") for i in keep]
    rows += [(losses[i][0], avg[i], "moving average") for i in keep]
    rows += [(s, v, "validation") for s, v in snap["val_losses"]] or [(losses[0][0], float("nan"), "validation")]
    return pd.DataFrame({"step": pd.Series([r[0] for r in rows], dtype="int64"),
                         "loss": pd.Series([r[1] for r in rows], dtype="float64"),
                         "series": pd.Series([r[2] for r in rows], dtype="object")})


# ---------------------------------------------------------------------------------------------------
# the tab
# ---------------------------------------------------------------------------------------------------


def _sample_caption(path: str, step: int) -> str:
    """'step 30' for a step's grid; the end-of-run grids (final, progress) by name, as several share the last step."""
    stem = Path(path).stem
    return f"step {step}" if stem.startswith("step") else f"{stem} (step {step})"


def _widget(gr, policy: PathPolicy, name: str, value: Any, label: str, **kw):
    """The widget of a field or an option, by its kind (field_kind); no per-option code."""
    kind, eid = field_kind(name), "train-" + name.replace("_", "-")
    kw = {"label": label, "elem_id": eid, **kw}
    if kind == "model":
        return gr.Dropdown(choices=policy.model_choices(), value=value, allow_custom_value=True, **kw)
    if kind == "bool":
        return gr.Checkbox(value=bool(value), **kw)
    if kind == "optbool":
        return gr.Dropdown(choices=[NOT_SET, "true", "false"], value=value, **kw)
    if kind == "choice":  # an option that also takes a file (preset = "my.toml") takes typed values
        spec = OPTIONS[name]
        return gr.Dropdown(choices=list(spec.choices), value=value, allow_custom_value=bool(spec.file_suffix), **kw)
    if kind == "unit":
        return gr.Radio(["steps", "epochs"], value=value, **kw)
    if kind in ("int", "optint", "float", "optfloat"):
        return gr.Number(value=value, precision=0 if kind.endswith("int") else None, **kw)
    if kind == "lines":
        return gr.Textbox(value=value, lines=2, **kw)
    if kind == "toml":
        return gr.Textbox(value=value, elem_classes=["mono"], **kw)
    return gr.Textbox(value=value, **kw)


SECTION_COLUMNS = 3  # widgets per row in the generated sections


def _sections(gr, policy: PathPolicy, defaults: dict[str, Any]) -> dict[str, Any]:
    """One collapsed accordion per option table, a widget per option without a field (section_options)."""
    comps: dict[str, Any] = {}
    for group, names in section_options().items():
        title = f"{GROUP_TITLES.get(group, group)} [{group}] · {len(names)} options"
        with gr.Accordion(title, open=False, elem_id=f"train-group-{group}"):
            for i in range(0, len(names), SECTION_COLUMNS):
                with gr.Row(equal_height=False):
                    for name in names[i:i + SECTION_COLUMNS]:
                        comps[name] = _widget(gr, policy, name, defaults.get(name), name, info=option_info(name))
    return comps


def _config_file_row(gr, policy: PathPolicy) -> dict[str, Any]:
    """The config file's path and its buttons: demo settings, load, save."""
    with gr.Row():
        return {
            "config_path": gr.Textbox(label="Config file (.toml, same format as sd-loha train --config)", scale=4,
                                      value=str(policy.outputs_dir / "my_loha.toml"), elem_id="train-config-path"),
            "demo_btn": gr.Button("Demo settings", scale=1, min_width=60, elem_id="train-demo",
                                  visible=DEMO_TOML.is_file()),
            "load_btn": gr.Button("Load", scale=0, min_width=60, elem_id="train-load"),
            "save_btn": gr.Button("Save", scale=0, min_width=60, elem_id="train-save"),
        }


def _model_and_data_rows(gr, policy: PathPolicy, field: Callable[..., Any]) -> dict[str, Any]:
    """The base model, the dataset (with its check button) and where the adapter goes."""
    with gr.Row():
        field("pretrained_model", scale=2)
        refresh_models = gr.Button("↻", scale=0, min_width=40, elem_id="train-refresh-models")
    with gr.Row():
        field("train_data_dir", scale=3, placeholder="e.g. my_style (= data/my_style)",
              info="Folders: " + ", ".join(policy.dataset_choices()[:6]))
        check_btn = gr.Button("Check dataset", scale=1, elem_id="train-check")
    with gr.Row():
        field("output_dir", scale=3)
        field("output_name", scale=2)
        field("overwrite", scale=1)
    return {"refresh_models": refresh_models, "check_btn": check_btn}


def _training_rows(gr, field: Callable[..., Any]) -> None:
    """The LoHA network's size, the learning rates, the run's length and its samples."""
    rows = (("preset", "network_dim", "network_alpha", "conv_dim", "conv_alpha", "train_text_encoder"),
            ("learning_rate", "unet_lr", "text_encoder_lr", "lr_scheduler"),
            ("length_unit", "length", "resolution", "train_batch_size", "seed", "save_every_n_steps"))
    for names in rows:
        with gr.Row():
            for name in names:
                field(name)
    with gr.Row():
        field("sample_prompts", scale=3)
        field("sample_every_n_steps", scale=1)
        field("sample_steps", scale=1)


def _all_options_and_toml(gr, policy: PathPolicy, defaults: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(a widget per option without a field, the TOML box and its Apply button)."""
    gr.Markdown("**All options**, by table of the config file (the fields above are not repeated; "
                "options: docs/config.md)", elem_id="train-all-options")
    comps = _sections(gr, policy, defaults)
    with gr.Accordion("TOML (the config file)", open=False, elem_id="train-toml-file"):
        gr.Markdown("The settings above as the file `sd-loha train --config FILE` reads. What you type here "
                    "wins over the widgets when you press Start, Save or Check dataset (a deleted line "
                    "does not unset its option); Start, Save, Load and Apply write the one resulting config "
                    "back into both.")
        toml_box = gr.Textbox(value=start_toml(), label="TOML", lines=14, max_lines=40, elem_id="train-toml",
                              elem_classes=["mono"])
        apply_btn = gr.Button("Apply TOML to the form", elem_id="train-apply")
    return comps, {"toml_box": toml_box, "apply_btn": apply_btn}


def _run_panel(gr, runner: TrainingRunner) -> dict[str, Any]:
    """The right-hand column: Start/Stop/Resume, the message, the run's status, results, loss, samples,
    the dataset preflight and the log."""
    ui: dict[str, Any] = {}
    with gr.Row():
        ui["start_btn"] = gr.Button("Start", variant="primary", elem_id="train-start")
        ui["stop_btn"] = gr.Button("Stop", variant="stop", elem_id="train-stop")
        ui["resume_btn"] = gr.Button("Resume", elem_id="train-resume")
    ui["message"] = gr.Markdown(elem_id="train-message")
    ui["status"] = gr.HTML(status_html(runner.snapshot()), elem_id="train-status")
    ui["result"] = gr.Markdown(elem_id="train-result")
    ui["result_file"] = gr.File(label="Adapter file", interactive=False, elem_id="train-file")
    ui["loss_plot"] = gr.LinePlot(loss_frame(runner.snapshot()), x="step", y="loss", color="series",
                                  color_map={"training loss": "#a8b3bf", "moving average": "#1f4e9c",
                                             "validation": "#c0392b"},
                                  label="Loss", height=260, elem_id="train-loss")
    ui["samples"] = gr.Gallery(label="Sample images", columns=2, height=420, object_fit="contain",
                               elem_id="train-samples")  # labelled grids: shown whole, not cropped to squares
    with gr.Accordion("Dataset preflight", open=True):
        ui["pre_md"] = gr.Markdown(elem_id="train-preflight")
        ui["thumbs"] = gr.Gallery(label="First images and their captions", columns=4, height=220,
                                  elem_id="train-thumbs")
    with gr.Accordion("Log", open=False):
        ui["log_box"] = gr.Textbox(lines=8, max_lines=8, show_label=False, elem_id="train-log", interactive=False)
    return ui


def _read(values: tuple) -> tuple[dict[str, Any], str, str]:
    """(form, box, synced) from the settings' values (the order of build's `settings`)."""
    n, sections = len(FIELD_NAMES), section_names()
    form = dict(zip(FIELD_NAMES, values[:n]))
    form.update(zip(sections, values[n + 1:n + 1 + len(sections)]))
    return form, values[n], values[-1]


def _write(cfg: TrainConfig, toml_text: str | None = None) -> list[Any]:
    """Every widget, the box (the config's TOML unless given) and its sync for one config."""
    f = config_to_form(cfg)
    text = cfg.to_toml() if toml_text is None else toml_text
    return [*(f[n] for n in FIELD_NAMES), text, *(f[n] for n in section_names()), text]


def _prepare(policy: PathPolicy, values: tuple, *, resume: bool) -> TrainConfig:
    """The config a Start or Resume runs, with every check that can be made before it starts."""
    form, toml_text, sync = _read(values)
    cfg = build_config(policy, form, toml_text, sync)
    check_paths(cfg)
    folders = [Path(d) for d in (cfg.train_data_dir, cfg.reg_data_dir, cfg.conditioning_data_dir) if d]
    escapes = [e for d in folders if d.is_dir() for e in dataset_escapes(policy, d)]
    if escapes:
        raise PathRefused("the dataset folder holds links that lead outside the allowed folders: " + ", ".join(escapes))
    if resume:
        from sd_loha.train.state import latest_state

        out = Path(cfg.output_dir)
        if not out.is_dir() or latest_state(out) is None:
            raise ConfigError([f"there is no saved training state in {out} to resume from; press Start for a new "
                               "run (or choose the output folder of the run to continue)"], header="nothing to resume")
    else:
        try:
            check_output_dir(cfg)
        except ConfigError as e:
            raise ConfigError([p.message + ". Tick 'Overwrite' to replace them, press Resume to continue that "
                               "run, or choose another output folder / name" for p in e.problems],
                              header="output folder in use") from None
    return cfg


def build(policy: PathPolicy, runner: TrainingRunner) -> dict[str, Any]:
    """The Training tab: the settings (left), the run (right), and their events."""
    import gradio as gr

    defaults = default_form(policy)
    comps: dict[str, Any] = {}

    def field(name: str, **kw):
        comps[name] = _widget(gr, policy, name, defaults.get(name), FIELDS[name], **kw)
        return comps[name]

    with gr.Row():
        with gr.Column(scale=3):
            ui = _config_file_row(gr, policy)
            ui.update(_model_and_data_rows(gr, policy, field))
            _training_rows(gr, field)
            sections, box = _all_options_and_toml(gr, policy, defaults)
            comps.update(sections)
            ui.update(box)
        with gr.Column(scale=2):
            ui.update(_run_panel(gr, runner))
    # The settings' inputs: the fields, the TOML box, the sections' widgets (the endpoints' order: a script may pass
    # the fields and the box and leave the rest at the page's values), then the box as the page last wrote it.
    ui["synced"] = gr.State(start_toml())
    ui["settings"] = [*(comps[n] for n in FIELD_NAMES), ui["toml_box"], *(comps[n] for n in section_names()),
                      ui["synced"]]
    ui["seen"] = gr.State(-1)
    return _wire(gr, policy, runner, ui, comps)


def _wire(gr, policy: PathPolicy, runner: TrainingRunner, ui: dict[str, Any], comps: dict[str, Any]) -> dict[str, Any]:
    """Every event of the tab (in the order the page registers them: the endpoints keep their numbers); returns
    build's result: the poll and the page-load restore for the app, the TOML box, the settings' widgets."""
    settings, message, pre_md, thumbs = ui["settings"], ui["message"], ui["pre_md"], ui["thumbs"]
    writes = settings  # what Load, Demo, Apply, Start and Save write back: every widget, the box, its sync
    run = _run_handlers(gr, runner)
    on = _settings_handlers(gr, policy, runner, len(writes))
    poll_outputs = [ui[k] for k in ("status", "loss_plot", "samples", "result", "result_file", "log_box", "stop_btn",
                                    "seen")]
    then_poll = dict(api_name=False, show_progress="hidden")

    ui["check_btn"].click(on["check"], settings, [pre_md, thumbs], api_name="preflight")
    comps["train_data_dir"].submit(on["check"], settings, [pre_md, thumbs], api_name=False)
    ui["start_btn"].click(on["start"], settings, [message, *writes], api_name="start_training",
                          concurrency_id="train_control").then(run["poll"], ui["seen"], poll_outputs, **then_poll)
    ui["resume_btn"].click(on["resume"], settings, [message, *writes], api_name="resume_training",
                           concurrency_id="train_control").then(run["poll"], ui["seen"], poll_outputs, **then_poll)
    ui["stop_btn"].click(run["stop"], None, message, api_name="stop_training")
    ui["load_btn"].click(on["load_file"], ui["config_path"], [message, *writes], api_name="load_config")
    ui["save_btn"].click(on["save_file"], [ui["config_path"], *settings], [message, *writes], api_name="save_config")
    ui["demo_btn"].click(on["demo"], None, [message, *writes], api_name=False)
    ui["apply_btn"].click(on["apply"], ui["toml_box"], [message, *writes], api_name=False)
    ui["refresh_models"].click(on["refresh_models"], None, comps["pretrained_model"], api_name=False)

    timer = gr.Timer(1.0)
    timer.tick(run["poll"], ui["seen"], poll_outputs, api_name=False, show_progress="hidden", queue=False)
    # for scripts: gradio_client .predict(api_name="/training_status")
    gr.api(run["api_status"], api_name="training_status")
    return {"poll": (run["poll"], ui["seen"], poll_outputs), "restore": (on["page_load"], [*writes, pre_md, thumbs]),
            "toml_box": ui["toml_box"], **comps}


def _run_handlers(gr, runner: TrainingRunner) -> dict[str, Callable[..., Any]]:
    """What the run's controls call: stop, the 1 s poll of the run's state, the training_status endpoint."""

    def on_stop():
        if runner.stop():
            return "Stop requested: the run stops after the current step and saves a resumable state."
        return "No training run is active."

    def on_poll(last_version):
        snap = runner.snapshot()
        if snap["version"] == last_version:
            return (gr.skip(),) * 8
        samples_val = [(p, _sample_caption(p, s)) for p, s in snap["samples"] if Path(p).is_file()]
        out_file = snap["output"] if snap["output"] and Path(snap["output"]).is_file() else None
        return (status_html(snap), loss_frame(snap), samples_val[::-1], result_markdown(snap), out_file,
                "\n".join(snap["log"][-50:]), gr.update(interactive=snap["active"]), snap["version"])

    def api_status() -> dict:
        """The training job's state: status, step, total, loss history, samples, output file, error."""
        snap = runner.snapshot()
        snap.pop("log", None)
        return snap

    return {"stop": on_stop, "poll": on_poll, "api_status": api_status}


def _settings_handlers(gr, policy: PathPolicy, runner: TrainingRunner, n_writes: int) -> dict[str, Callable[..., Any]]:
    """What the buttons that read or write the settings call: Check dataset, Start, Resume, Load, Save, Demo,
    Apply, ↻, and the page load. Each returns a message and every setting (or skips them all)."""
    skip_writes = [gr.skip()] * n_writes

    def on_check(*values):
        form, toml_text, sync = _read(values)
        try:
            rep = preflight_report(policy, form, toml_text, sync)
        except (PathRefused, ConfigError, ValueError) as e:
            return f"**Dataset check failed**\n\n```text\n{e}\n```", []
        except Exception as e:  # noqa: BLE001 - shown, never a dead button
            return f"**Dataset check failed**\n\n```text\n{describe_error(e)}\n```", []
        return preflight_markdown(rep), preflight_thumbnails(rep)

    def on_start(*values, resume: bool = False):
        busy = runner.busy_message()
        if busy:  # say so before validating anything
            return f"⚠ {busy}", *skip_writes
        try:
            cfg = _prepare(policy, values, resume=resume)
            runner.start(cfg, resume=resume)
        except RunActive as e:
            return f"⚠ {e}", *skip_writes
        except (PathRefused, ConfigError, ValueError) as e:
            return f"**Cannot start:**\n\n```text\n{e}\n```", *skip_writes
        except Exception as e:  # noqa: BLE001
            return f"**Cannot start:**\n\n```text\n{describe_error(e)}\n```", *skip_writes
        verb = "Resumed" if resume else "Started"
        return f"{verb}: training into `{cfg.output_dir}` ({cfg.output_name}).", *_write(cfg)

    def on_resume(*values):
        return on_start(*values, resume=True)

    def on_load_file(path_text):
        try:
            p = policy.resolve(path_text, "config_read", must_exist=True, what="config file")
            cfg = file_config(policy, p)
        except (PathRefused, ConfigError) as e:
            return f"**Cannot load:**\n\n```text\n{e}\n```", *skip_writes
        return f"Loaded `{p}`.", *_write(cfg)

    def on_demo():
        try:
            cfg = demo_config(policy)
        except ConfigError as e:
            return f"**Cannot load the demo settings:**\n\n```text\n{e}\n```", *skip_writes
        return f"Demo settings from `{DEMO_TOML.name}`: {cfg.pretrained_model} on the demo images.", *_write(cfg)

    def on_save_file(path_text, *values):
        form, toml_text, sync = _read(values)
        try:
            p = policy.resolve(path_text, "config_write", what="config file")
            if p.suffix.lower() != ".toml":
                raise PathRefused(f"config file '{path_text}': use a .toml file name")
            cfg = build_config(policy, form, toml_text, sync)
        except (PathRefused, ConfigError, ValueError) as e:
            return f"**Cannot save:**\n\n```text\n{e}\n```", *skip_writes
        text = cfg.to_toml()
        try:
            write_atomic(p, text.encode("utf-8"))
        except OSError as e:
            return f"**Cannot save:**\n\n```text\n{e}\n```", *skip_writes
        return f"Saved `{p}` (train it from the command line with `sd-loha train --config {p}`).", *_write(cfg, text)

    def on_apply(toml_text):
        try:
            cfg = toml_box_config(policy, toml_text)
        except ConfigError as e:
            return f"**TOML problem:**\n\n```text\n{e}\n```", *skip_writes
        return "Applied the TOML to the form.", *_write(cfg, toml_text)

    def on_page_load():
        """A browser that (re)connects gets the settings and dataset report of the current or last run."""
        cfg, snap = runner.last_config, runner.snapshot()
        if cfg is None:
            return (*skip_writes, gr.skip(), gr.skip())
        rep = snap.get("preflight_report")
        thumbs_v = [t for t in preflight_thumbnails(rep) if policy.inside(t[0])] if rep else gr.skip()
        return (*_write(cfg), preflight_markdown(rep) if rep else gr.skip(), thumbs_v)

    def on_refresh_models():
        return gr.update(choices=policy.model_choices())

    return {"check": on_check, "start": on_start, "resume": on_resume, "load_file": on_load_file,
            "save_file": on_save_file, "demo": on_demo, "apply": on_apply, "page_load": on_page_load,
            "refresh_models": on_refresh_models}
