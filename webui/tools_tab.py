"""Tools tab: bake adapters into a base model (`sd-loha merge`) and convert an adapter file (`sd-loha convert`);
the Inspect tab's metadata editor (`sd-loha meta`) and block weights are here too.

Each action is one function over the library call the CLI makes (sd_loha.bake.bake_adapters,
sd_loha.convert.convert_to_lora_file, sd_loha.peft_format.convert_to_peft / convert_to_kohya,
sd_loha.meta.edit_metadata): the UI only checks paths against its folders (webui/paths.py), turns the boxes
into the library's arguments and shows the library's report or message.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_loha.bake import DTYPES, BakeReport, adapter_hash_label, bake_adapters
from sd_loha.blocks import BLOCK_IDS, parse_block_weights
from sd_loha.io import addnet_hash
from sd_loha.meta import FIELDS, edit_metadata, read_metadata, thumbnail_data_url

from .defaults import DEFAULT_MODEL
from .generate_tab import N_SLOTS, adapter_spec, block_weights_box
from .paths import PathPolicy, PathRefused

#: `sd-loha convert --to` targets as the Tools tab offers them: target -> its label.
CONVERT_TARGETS: dict[str, str] = {
    "lora": "kohya LoRA/LoCon (truncated SVD of each layer's change; a rank or an energy)",
    "peft": "PEFT LoHa folders (unet/ or transformer/, text_encoder/, ...; the same factors)",
    "kohya": "a PEFT LoHa folder as a kohya/LyCORIS LoHA file (the same factors)",
}
DEFAULT_MERGE_NAME = "merged/merged.safetensors"

Progress = Callable[[str, float], None]


OVERWRITE_LABEL = "Overwrite an existing output of this name"


def _output(policy: PathPolicy, out_name: str, what: str, overwrite: bool) -> Path:
    """The output path of an action; an existing file or folder there is kept unless `overwrite` is ticked."""
    out = policy.output_path(out_name, what=what)
    if out.exists() and not overwrite:
        raise ValueError(f"{what} '{out_name}' already exists ({out}); choose another name, or tick "
                         f"'{OVERWRITE_LABEL}' to replace it")
    return out


# ------------------------------------------------------------------------------------------------ merge


def merge(policy: PathPolicy, model: str, adapters: Sequence[tuple], out_name: str, dtype: str = "fp16",
          progress: Progress | None = None, overwrite: bool = False) -> BakeReport:
    """`sd-loha merge` from the Tools tab: `adapters` are the slots' (path, strength, te_strength, block weights);
    empty slots are skipped. The output goes under the outputs folder (a .safetensors name: one checkpoint file;
    any other name: a diffusers folder); an existing one is replaced only with `overwrite`."""
    specs = [adapter_spec(policy, f"adapter {i + 1}", *slot) for i, slot in enumerate(adapters) if (slot[0] or "").strip()]
    if not specs:
        raise ValueError("no adapter to merge: choose at least one adapter file")
    base = policy.check_model(model)
    out = _output(policy, out_name, "merged model", overwrite)
    return bake_adapters(base, specs, out, dtype, progress=progress)


def merge_markdown(report: BakeReport, policy: PathPolicy) -> str:
    lines = [f"**Wrote** `{report.out}` ({report.layout}, {report.dtype}, {report.family}) from `{report.base_model}`",
             "", "| adapter | strength | text encoder | block weights | layers | hash |", "|---|---:|---:|---|---:|---|"]
    lines += [f"| `{a['file']}` | {a['strength']:g} | {a['te_strength']:g} | {a.get('block_weights') or '—'} | "
              f"{a['layers']} | `{adapter_hash_label(a)}` |" for a in report.adapters]
    if policy.inside(report.out, "model"):
        layout = ("in the original checkpoint layout (the keys A1111, ComfyUI and diffusers' from_single_file read)"
                  if report.layout == "single-file" else "a diffusers folder (diffusers' from_pretrained reads it)")
        lines += ["", f"It is in the model lists now (↻ in the Generate tab) and is {layout}."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ convert


@dataclass
class ConvertResult:
    """What a conversion wrote, as the tab shows it: a message, and for `--to lora` the error tables."""

    message: str
    blocks: list[dict[str, Any]]  # block, relative error
    layers: list[dict[str, Any]]  # module, block, rank, max rank, energy kept, relative error


def _optional_number(value: Any, what: str, kind: type = float) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        v = kind(value) if kind is float else int(float(value))
    except (TypeError, ValueError):
        raise ValueError(f"{what} '{value}' is not a number") from None
    if not math.isfinite(v) or (kind is int and v != float(value)):
        raise ValueError(f"{what} '{value}' must be a finite {'whole ' if kind is int else ''}number")
    return v


#: `--lora-form` choices (SD 3.x files): form -> its label
LORA_FORMS: dict[str, str] = {"kohya": "kohya (kohya sd-scripts, ComfyUI, Forge)",
                              "diffusers": "diffusers (StableDiffusion3Pipeline.load_lora_weights, PEFT)"}


def convert(policy: PathPolicy, source: str, target: str, out_name: str, *, rank: Any = None, energy: Any = None,
            model: str | None = None, dtype: str | None = None, overwrite: bool = False,
            lora_form: str = "kohya") -> ConvertResult:
    """`sd-loha convert SOURCE --to TARGET --out OUT` from the Tools tab. `rank`/`energy` (empty = not set) are
    for `lora` only, exactly one of them; `model` (empty = none) is the base model when the file needs it;
    `lora_form` (lora, SD 3.x files): kohya's or diffusers' LoRA. An existing output is replaced only with
    `overwrite`."""
    if target not in CONVERT_TARGETS:
        raise ValueError(f"convert: target {target!r}: choose one of {', '.join(CONVERT_TARGETS)}")
    src = (policy.check_peft_folder(source, what="PEFT adapter") if target == "kohya"
           else policy.check_adapter(source, what="adapter file"))
    out = _output(policy, out_name, "converted file", overwrite)
    base = policy.check_model(model) if (model or "").strip() else None
    if (lora_form or "kohya") not in LORA_FORMS:
        raise ValueError(f"convert to lora: LoRA form {lora_form!r}: choose one of {', '.join(LORA_FORMS)}")
    if target == "lora":
        return _convert_to_lora(src, out, _optional_number(rank, "rank", int), _optional_number(energy, "energy"),
                                base, dtype or None, lora_form or "kohya")
    if rank not in (None, "") or energy not in (None, ""):
        raise ValueError(f"convert to {target}: rank and energy are for --to lora only (the factors are copied as they are)")
    if target == "peft":
        from sd_loha.peft_format import convert_to_peft

        folders = convert_to_peft(src, out, model=base)
        return ConvertResult("**Wrote** PEFT adapters: " + ", ".join(f"`{f}`" for f in folders.values()), [], [])
    from sd_loha.peft_format import convert_to_kohya

    return ConvertResult(f"**Wrote** `{convert_to_kohya(src, out, model=base)}`", [], [])


def _convert_to_lora(src: Path, out: Path, rank: int | None, energy: float | None, model: str | None,
                     dtype: str | None, form: str = "kohya") -> ConvertResult:
    from sd_loha.convert import convert_to_lora_file
    from sd_loha.network import SAVE_DTYPES

    if dtype is not None and dtype not in SAVE_DTYPES:
        raise ValueError(f"convert to lora: dtype {dtype!r}: choose one of {', '.join(SAVE_DTYPES)} (empty = the source's)")
    report = convert_to_lora_file(src, out, rank=rank, energy=energy, model=model,
                                  dtype=SAVE_DTYPES[dtype] if dtype else None, form=form)
    ranks = [x.rank for x in report.layers] or [0]
    span = f"{min(ranks)}" + (f"..{max(ranks)}" if max(ranks) != min(ranks) else "")
    message = (f"**Wrote** `{out}`: {len(report.layers)} layers, rank {span}, relative error "
               f"{report.total:.3g} overall (‖ΔW − ΔW_LoRA‖ / ‖ΔW‖, of the factors as written)"
               + "".join(f"\n\nNote: {n}" for n in report.notes))
    blocks = [{"block": b, "relative error": e} for b, e in report.blocks.items()]
    layers = [{"module": x.name, "block": x.block, "rank": x.rank, "max rank": x.max_rank, "energy kept": x.energy,
               "relative error": x.relative_error} for x in report.layers]
    return ConvertResult(message, blocks, layers)


# ------------------------------------------------------------------------------------------------ metadata


@dataclass
class MetaFields:
    """The editable metadata fields of a file (empty string = not set) and all of its metadata."""

    title: str
    trigger: str
    description: str
    thumbnail: Any  # a PIL image, or None
    metadata: dict[str, str]


def _thumbnail_image(value: str | None):
    if not value or not value.startswith("data:") or ";base64," not in value:
        return None
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(base64.b64decode(value.split(";base64,", 1)[1])))
        im.load()
    except Exception:  # noqa: BLE001 - a damaged thumbnail is shown as none, the rest still edits
        return None
    return im


def read_meta(policy: PathPolicy, path: str) -> MetaFields:
    meta = read_metadata(policy.check_adapter(path, what="adapter file"))
    return MetaFields(meta.get(FIELDS["title"], ""), meta.get(FIELDS["trigger"], ""), meta.get(FIELDS["description"], ""),
                      _thumbnail_image(meta.get(FIELDS["thumbnail"])), meta)


def save_meta(policy: PathPolicy, path: str, title: str, trigger: str, description: str,
              thumbnail: str | None = None, remove_thumbnail: bool = False) -> tuple[str, dict[str, str]]:
    """`sd-loha meta FILE --title ... --trigger ... --description ... [--thumbnail IMG]` in place: an emptied box
    removes its key; the thumbnail changes only when an image is given (or removed). Returns a message naming the
    addnet hash (unchanged: only the header is rewritten) and the new metadata."""
    p = policy.check_adapter(path, what="adapter file", edit=True)
    changes: dict[str, str | None] = {FIELDS[k]: (v or "").strip() or None
                                      for k, v in (("title", title), ("trigger", trigger), ("description", description))}
    if thumbnail:
        changes[FIELDS["thumbnail"]] = thumbnail_data_url(thumbnail)
    elif remove_thumbnail:
        changes[FIELDS["thumbnail"]] = None
    before = addnet_hash(p)
    meta = edit_metadata(p, changes)
    after = addnet_hash(p)
    same = "unchanged" if after == before else f"changed from {before[:12]}"
    return f"**Saved** `{p.name}`: addnet hash `{after[:12]}` ({same}: the tensors were not touched)", meta


# ------------------------------------------------------------------------------------------------ block weights


def block_weights_rows(spec: str | None) -> list[dict[str, Any]]:
    """Each of LoRA Block Weight's 26 block ids with the weight `spec` gives it (empty spec: every block 1)."""
    bw = parse_block_weights(spec) if (spec or "").strip() else None
    return [{"block": b, "weight": 1.0 if bw is None else bw.weight(b)} for b in BLOCK_IDS]


# ------------------------------------------------------------------------------------------------ the page


def error_markdown(action: str, e: BaseException) -> str:
    from .runner import describe_error

    text = str(e) if isinstance(e, (PathRefused, ValueError)) else describe_error(e)
    return f"**{action}:**\n\n```text\n{text}\n```"


def _frame(rows: list[dict[str, Any]], columns: Sequence[str]):
    import pandas as pd

    return pd.DataFrame(rows, columns=list(columns))


BLOCK_COLUMNS = ("block", "relative error")
LAYER_COLUMNS = ("module", "block", "rank", "max rank", "energy kept", "relative error")


def build(policy: PathPolicy) -> dict[str, Any]:
    import gradio as gr

    from .generate_tab import _choices

    adapter_choices = _choices(policy)
    with gr.Accordion("Merge: bake adapters into a base model (sd-loha merge)", open=True, elem_id="merge-section"):
        with gr.Row():
            m_model = gr.Dropdown(choices=policy.model_choices(), value=DEFAULT_MODEL, allow_custom_value=True,
                                  label="Base model", elem_id="merge-model", scale=3)
            m_dtype = gr.Radio(choices=list(DTYPES), value="fp16", label="dtype (merged in fp32, cast once)",
                               elem_id="merge-dtype", scale=1)
        m_slots = []
        for i in range(N_SLOTS):
            with gr.Row():
                f = gr.Dropdown(choices=adapter_choices, value=None, allow_custom_value=True, scale=4,
                                label=f"Adapter {i + 1}" + (" (optional)" if i else ""), elem_id=f"merge-adapter-{i}")
                s = gr.Number(value=1.0, label="strength", scale=1, min_width=90, elem_id=f"merge-strength-{i}")
                t = gr.Textbox(value="", label="TE strength (empty = same)", scale=1, min_width=90,
                               placeholder="same", elem_id=f"merge-te-{i}")
                b = block_weights_box(f"merge-lbw-{i}", scale=2, min_width=140)
            m_slots.append((f, s, t, b))
        with gr.Row():
            m_out = gr.Textbox(value=DEFAULT_MERGE_NAME, scale=4, elem_id="merge-out",
                               label="Output, in the outputs folder (NAME.safetensors: one checkpoint in the original "
                                     "layout; any other name: a diffusers folder)")
            m_overwrite = gr.Checkbox(value=False, label=OVERWRITE_LABEL, scale=1, elem_id="merge-overwrite")
            m_go = gr.Button("Merge", variant="primary", scale=1, elem_id="merge-go")
        m_report = gr.Markdown(elem_id="merge-report")

    with gr.Accordion("Convert an adapter file (sd-loha convert)", open=True, elem_id="convert-section"):
        with gr.Row():
            c_file = gr.Dropdown(choices=adapter_choices, value=None, allow_custom_value=True, scale=3,
                                 label="Adapter file (.safetensors; --to kohya: a PEFT adapter folder)",
                                 elem_id="convert-file")
            c_target = gr.Radio(choices=[(f"{k}: {v}", k) for k, v in CONVERT_TARGETS.items()], value="lora",
                                label="Convert to", elem_id="convert-target", scale=3)
        with gr.Row():
            # text boxes, not numbers: an empty box must mean "not set" (a browser's empty number box sends 0)
            c_rank = gr.Textbox(value="", label="rank (lora; every layer, clipped to its full rank)",
                                placeholder="e.g. 8", elem_id="convert-rank", min_width=120)
            c_energy = gr.Textbox(value="", label="or energy (lora; per layer, the fraction of Σσ² kept)",
                                  placeholder="e.g. 0.99", elem_id="convert-energy", min_width=120)
            c_dtype = gr.Dropdown(choices=["", "fp16", "bf16", "fp32"], value="", label="dtype (lora; empty = the source's)",
                                  elem_id="convert-dtype", min_width=100)
            c_model = gr.Dropdown(choices=["", *policy.model_choices()], value="", allow_custom_value=True,
                                  label="Base model (only when the file does not tell its layers, or for DoRA)",
                                  elem_id="convert-model", min_width=160)
            c_form = gr.Dropdown(choices=[(v, k) for k, v in LORA_FORMS.items()], value="kohya",
                                 label="LoRA form (lora, SD 3.x files)", elem_id="convert-lora-form", min_width=160)
        with gr.Row():
            c_out = gr.Textbox(value="converted/lora.safetensors", scale=4, elem_id="convert-out",
                               label="Output, in the outputs folder (--to peft: a folder)")
            c_overwrite = gr.Checkbox(value=False, label=OVERWRITE_LABEL, scale=1, elem_id="convert-overwrite")
            c_go = gr.Button("Convert", variant="primary", scale=1, elem_id="convert-go")
        c_report = gr.Markdown(elem_id="convert-report")
        with gr.Row():
            c_blocks = gr.Dataframe(value=_frame([], BLOCK_COLUMNS), label="Relative error per block",
                                    interactive=False, elem_id="convert-blocks", scale=1)
            c_layers = gr.Dataframe(value=_frame([], LAYER_COLUMNS), label="Per layer", interactive=False,
                                    elem_id="convert-layers", scale=2, max_height=400)

    def on_merge(model, dtype, out_name, *slot_vals, progress=gr.Progress()):
        *slot_vals, overwrite = slot_vals  # the overwrite checkbox is the last input, after the slots
        n = len(m_slots[0])
        slots = [tuple(slot_vals[i:i + n]) for i in range(0, len(slot_vals), n)]
        try:
            report = merge(policy, model, slots, out_name, dtype, progress=lambda what, frac: progress(frac, desc=what),
                           overwrite=bool(overwrite))
        except Exception as e:  # noqa: BLE001 - every failure is shown in words, the queue keeps running
            return error_markdown("Cannot merge", e)
        return merge_markdown(report, policy)

    def on_convert(source, target, out_name, rank, energy, dtype, model, overwrite=False, lora_form="kohya"):
        try:
            r = convert(policy, source, target, out_name, rank=rank, energy=energy, model=model, dtype=dtype,
                        overwrite=bool(overwrite), lora_form=lora_form)
        except Exception as e:  # noqa: BLE001
            return error_markdown("Cannot convert", e), gr.skip(), gr.skip()
        # four decimals shown (the report keeps every digit; --json on the command line prints them)
        return r.message, _frame(r.blocks, BLOCK_COLUMNS).round(4), _frame(r.layers, LAYER_COLUMNS).round(4)

    def on_target(target):
        suffix = {"peft": "converted/peft", "kohya": "converted/from_peft.safetensors"}.get(target, "converted/lora.safetensors")
        return gr.update(value=suffix)

    m_go.click(on_merge, [m_model, m_dtype, m_out, *[c for slot in m_slots for c in slot], m_overwrite], m_report,
               api_name="merge", concurrency_limit=1, concurrency_id="generation")
    c_go.click(on_convert, [c_file, c_target, c_out, c_rank, c_energy, c_dtype, c_model, c_overwrite, c_form],
               [c_report, c_blocks, c_layers], api_name="convert", concurrency_limit=1, concurrency_id="generation")
    c_target.change(on_target, c_target, c_out, api_name=False)

    def on_refresh():
        ch = _choices(policy)
        models = policy.model_choices()
        return (gr.update(choices=models), *[gr.update(choices=ch) for _ in m_slots], gr.update(choices=ch),
                gr.update(choices=["", *models]))

    return {"refresh": (on_refresh, [m_model, *[s[0] for s in m_slots], c_file, c_model])}


def build_inspect_extras(policy: PathPolicy, file, metadata) -> dict[str, Any]:
    """Below the Inspect tab's chart: block weights (LoRA Block Weight's ids and what a preset or list gives each,
    sent to a Generate slot) and the metadata editor of the inspected file."""
    import gradio as gr

    with gr.Row():
        with gr.Column(scale=2):
            lbw = block_weights_box("inspect-lbw")
            lbw_msg = gr.Markdown(elem_id="inspect-lbw-message")
            lbw_use = gr.Button("Use this file and these block weights in Generate (file 1)", elem_id="inspect-lbw-use")
        with gr.Column(scale=3):
            lbw_table = gr.Dataframe(value=_frame(block_weights_rows(None), ("block", "weight")), interactive=False,
                                     label="Weight per block (LoRA Block Weight's ids: BASE = text encoders, IN/M/OUT "
                                           "= the UNet's input, middle, output blocks)",
                                     elem_id="inspect-lbw-table", max_height=260)
    with gr.Accordion("Edit metadata (sd-loha meta: title, trigger words, description, thumbnail)", open=False,
                      elem_id="meta-section"):
        with gr.Row():
            with gr.Column(scale=3):
                title = gr.Textbox(label="Title (modelspec.title)", elem_id="meta-title")
                trigger = gr.Textbox(label="Trigger words (modelspec.trigger_phrase)", elem_id="meta-trigger")
                description = gr.Textbox(label="Description (modelspec.description)", lines=3, elem_id="meta-description")
            with gr.Column(scale=2):
                current = gr.Image(label="Thumbnail in the file", interactive=False, height=160, elem_id="meta-thumb")
                new_thumb = gr.Image(label="New thumbnail (PNG/JPEG/WebP)", type="filepath", sources=["upload"],
                                     height=160, elem_id="meta-new-thumb")
                remove = gr.Checkbox(label="Remove the thumbnail", value=False, elem_id="meta-remove-thumb")
        with gr.Row():
            load = gr.Button("Read from the file", elem_id="meta-load")
            save = gr.Button("Save metadata into the file", variant="primary", elem_id="meta-save")
        meta_msg = gr.Markdown(elem_id="meta-message")

    def on_lbw(spec):
        try:
            rows = block_weights_rows(spec)
        except ValueError as e:
            return error_markdown("Block weights", e), gr.skip()
        return "", _frame(rows, ("block", "weight"))

    def on_load(path):
        try:
            m = read_meta(policy, path)
        except Exception as e:  # noqa: BLE001
            return error_markdown("Cannot read the metadata", e), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return f"{len(m.metadata)} metadata keys in `{Path(path).name}`", m.title, m.trigger, m.description, m.thumbnail

    def on_save(path, title_v, trigger_v, description_v, thumb_v, remove_v):
        try:
            msg, meta = save_meta(policy, path, title_v, trigger_v, description_v, thumb_v, bool(remove_v))
        except Exception as e:  # noqa: BLE001
            return error_markdown("Cannot save the metadata", e), gr.skip(), gr.skip()
        return msg, _thumbnail_image(meta.get(FIELDS["thumbnail"])), meta

    meta_fields = [meta_msg, title, trigger, description, current]
    lbw.change(on_lbw, lbw, [lbw_msg, lbw_table], api_name="block_weights")
    load.click(on_load, file, meta_fields, api_name="read_meta")
    save.click(on_save, [file, title, trigger, description, new_thumb, remove], [meta_msg, current, metadata],
               api_name="save_meta")
    return {"lbw": lbw, "lbw_use": lbw_use, "load": (on_load, meta_fields)}
