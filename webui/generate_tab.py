"""Generate tab: a base model with LoHA files merged at chosen strengths, single images or labelled grids.

All loading and merging is :class:`sd_loha.generate.GenerationSession`: the session is kept between
requests, so changing strengths re-strengthens the merged weights exactly instead of reloading. Grids (and the
one-click style-vs-strength grid, as `sd-loha generate --strength-grid` draws it) are :func:`sd_loha.grid.draw_grid`.
PNGs are written with :func:`sd_loha.generate.save_png` and carry A1111's ``parameters`` text. Requests queue
(concurrency 1).
"""


import math
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

from sd_loha.blocks import PRESETS, parse_block_weights
from sd_loha.generate import AdapterSpec, GenerationSession, save_png
from sd_loha.grid import STRENGTH_SWEEP, GridCell, draw_grid, prompt_lines
from sd_loha.train.lowmem import BASE_DTYPES
from sd_loha.schedulers import SCHEDULERS

from .defaults import (
    DEFAULT_GUIDANCE,
    DEFAULT_MODEL,
    DEFAULT_PROMPTS,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
)
from .paths import PathPolicy, PathRefused, split_list

N_SLOTS = 3
MAX_GRID_CELLS = 64
def parse_strengths(text: str) -> list[float]:
    out = []
    for t in split_list(text):
        try:
            v = float(t)
        except ValueError:
            raise ValueError(f"strength '{t}' is not a number (write e.g. 0, 0.5, 1)") from None
        if not math.isfinite(v):
            raise ValueError(f"strength '{t}' must be a finite number")
        out.append(v)
    return out


def parse_seeds(text: str) -> list[int]:
    out = []
    for t in split_list(text):
        try:
            out.append(int(t))
        except ValueError:
            raise ValueError(f"seed '{t}' is not a whole number (write e.g. 1, 2, 3; -1 = random)") from None
    return out


def adapter_spec(policy: PathPolicy, what: str, path: str, strength: float | None = None,
                 te: float | str | None = None, block_weights: str | None = None) -> AdapterSpec:
    """One adapter slot of the UI (file, strength, TE strength, block weights) as the AdapterSpec the CLI's
    `--loha FILE:S:TE:lbw=...` gives: the file checked against the folders, block weights read by
    sd_loha.blocks.parse_block_weights (what AdapterSpec.parse calls), empty boxes meaning "not set"."""
    p = policy.check_adapter(path, what=what)
    s = 1.0 if strength is None else float(strength)
    try:
        t = None if te is None or str(te).strip() == "" else float(te)
    except ValueError:
        raise ValueError(f"{what}: TE strength '{te}' is not a number (empty = same as strength)") from None
    if not (math.isfinite(s) and (t is None or math.isfinite(t))):
        raise ValueError(f"{what}: strengths must be finite numbers")
    lbw = (block_weights or "").strip() or None
    if lbw is not None:
        try:
            parse_block_weights(lbw)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
    return AdapterSpec(str(p), s, t, lbw)


class Generator:
    """Keeps one GenerationSession (per base model) and writes the images into outputs/generated/."""

    def __init__(self, policy: PathPolicy) -> None:
        self.policy = policy
        self.session: GenerationSession | None = None
        self._lock = threading.Lock()

    def _session(self, model: str, base_weight_dtype: str = "auto") -> GenerationSession:
        model = self.policy.check_model(model)
        s = self.session
        if s is None or s.model != model or s.base_weight_dtype != base_weight_dtype:
            self.session = None  # free the old pipeline before loading the next
            self.session = GenerationSession(model, base_weight_dtype=base_weight_dtype)
        return self.session

    def _specs(self, adapters: list[tuple]) -> list[AdapterSpec]:
        """(path, strength, te_strength[, block weights]) per slot; empty slots skipped."""
        return [adapter_spec(self.policy, f"LoHA file {i + 1}", *slot)
                for i, slot in enumerate(adapters) if (slot[0] or "").strip()]

    def _out_path(self, seed: int, tag: str = "") -> Path:
        folder = self.policy.outputs_dir / "generated" / time.strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        n = len(list(folder.glob("*.png")))
        while True:
            p = folder / f"{n:05d}-{tag}{seed}.png"
            if not p.exists():
                return p
            n += 1

    def generate(self, model: str, adapters: list[tuple], prompt: str, *,
                 negative_prompt: str = "", steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                 seed: int = -1, width: int | None = None, height: int | None = None, scheduler: str = DEFAULT_SAMPLER,
                 num_images: int = 1, base_weight_dtype: str = "auto") -> list[tuple[str, str, str]]:
        """[(png path, caption, parameters text)]; `adapters`: (path, strength, te_strength[, block weights]) each;
        `base_weight_dtype`: the base stored as the trainer's option of that name says (less GPU memory)."""
        with self._lock:
            specs = self._specs(adapters)
            session = self._session(model, base_weight_dtype)
            session.set_adapters(specs)
            results = session.generate(prompt, negative_prompt=negative_prompt, seed=int(seed), steps=int(steps),
                                       guidance_scale=float(guidance), width=width or None, height=height or None,
                                       scheduler=scheduler, num_images=int(num_images))
            out = []
            for image, params in results:
                s = _seed_of(params)
                path = save_png(image, self._out_path(s), params)
                label = ", ".join(f"{a.name} {a.strength:g}" + (f" lbw={a.block_weights}" if a.block_weights else "")
                                  for a in specs) or "no adapter"
                out.append((str(path), f"seed {s} · {label}", params))
            return out

    def grid(self, model: str, files: list[str], strengths: list[float], seeds: list[int], prompt: str, *,
             negative_prompt: str = "", steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
             width: int | None = None, height: int | None = None,
             scheduler: str = DEFAULT_SAMPLER, base_weight_dtype: str = "auto") -> tuple[str, list[tuple[str, str, str]]]:
        """Files × the prompt's lines (rows) against strengths × seeds (columns) in one labelled PNG, drawn by
        sd_loha.grid.draw_grid; every cell is saved too. Returns the grid's path and (path, caption, parameters)
        per cell, row by row."""
        if not files:
            raise ValueError("choose the LoHA files for the grid rows (or put one in the first adapter slot)")
        prompts = prompt_lines(prompt)
        n = len(files) * len(prompts) * max(1, len(strengths)) * max(1, len(seeds))
        if n > MAX_GRID_CELLS:
            raise ValueError(f"the grid would have {n} images; at most {MAX_GRID_CELLS} "
                             "(fewer files, prompt lines, strengths or seeds)")
        with self._lock:
            paths = [self.policy.check_adapter(f, what="grid file") for f in files]
            session = self._session(model, base_weight_dtype)
            saved: list[tuple[str, str, str]] = []

            def save(cell: GridCell) -> None:
                path = save_png(cell.image, self._out_path(cell.seed, "cell-"), cell.parameters)
                saved.append((str(path), cell.caption, cell.parameters))

            grid = draw_grid(session, paths, prompts, strengths, seeds, negative_prompt=negative_prompt,
                             steps=int(steps), guidance_scale=float(guidance), width=width or None,
                             height=height or None, scheduler=scheduler, on_cell=save)
            gpath = save_png(grid.image, self._out_path(grid.cells[0].seed, "grid-"), grid.parameters)
            return str(gpath), saved


def _seed_of(params: str) -> int:
    return int(params.splitlines()[-1].split("Seed: ")[1].split(",")[0])


def _choices(policy: PathPolicy) -> list[tuple[str, str]]:
    out = []
    for p in policy.adapter_files():
        label = p
        for r in policy.roots:
            if Path(p).is_relative_to(r.path):
                label = f"{r.kind}/{Path(p).relative_to(r.path).as_posix()}"
                break
        out.append((label, p))
    return out


def build(policy: PathPolicy) -> dict[str, Any]:
    import gradio as gr

    gen = Generator(policy)
    adapter_choices = _choices(policy)

    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                model = gr.Dropdown(choices=policy.model_choices(), value=DEFAULT_MODEL, allow_custom_value=True,
                                    label="Base model", elem_id="gen-model", scale=3)
                base_dtype = gr.Dropdown(choices=list(BASE_DTYPES), value="auto", label="Base weights", scale=1,
                                         min_width=110, elem_id="gen-base-dtype",
                                         info="fp8 / nf4 / int8: less GPU memory (nf4, int8: bitsandbytes)")
                refresh = gr.Button("↻ files", scale=0, min_width=70, elem_id="gen-refresh")
            slots = []
            for i in range(N_SLOTS):
                with gr.Row():
                    f = gr.Dropdown(choices=adapter_choices, value=None, allow_custom_value=True,
                                    label=f"LoHA file {i + 1}" + (" (optional)" if i else ""), scale=4,
                                    elem_id=f"gen-adapter-{i}")
                    s = gr.Number(value=1.0, label="strength", scale=1, min_width=90, elem_id=f"gen-strength-{i}")
                    t = gr.Textbox(value="", label="TE strength (empty = same)", scale=1, min_width=90,
                                   placeholder="same", elem_id=f"gen-te-{i}")
                    b = block_weights_box(f"gen-lbw-{i}", scale=2, min_width=140)
                slots.append((f, s, t, b))
            prompt = gr.Textbox(value=DEFAULT_PROMPTS[0], label="Prompt", lines=2, elem_id="gen-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="gen-negative")
            with gr.Row():
                steps = gr.Number(value=DEFAULT_STEPS, precision=0, label="Steps", elem_id="gen-steps", min_width=80)
                guidance = gr.Number(value=DEFAULT_GUIDANCE, label="Guidance", elem_id="gen-guidance", min_width=80)
                seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id="gen-seed", min_width=80)
                width = gr.Number(value=0, precision=0, label="Width (0 = model's)", elem_id="gen-width", min_width=80)
                height = gr.Number(value=0, precision=0, label="Height (0 = model's)", elem_id="gen-height", min_width=80)
                scheduler = gr.Dropdown(choices=list(SCHEDULERS), value=DEFAULT_SAMPLER, label="Scheduler",
                                        elem_id="gen-scheduler", min_width=120)
                count = gr.Number(value=1, precision=0, label="Images", elem_id="gen-count", min_width=70)
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="gen-go", scale=2)
                style_go = gr.Button("Style vs strength grid", elem_id="gen-style-grid", scale=1)
            with gr.Accordion("Grid: files × strengths × seeds in one labelled image", open=False):
                grid_files = gr.Dropdown(choices=adapter_choices, multiselect=True, allow_custom_value=True,
                                         label="Rows: LoHA files (e.g. a run's saved steps/epochs; empty = file 1), "
                                               "each × the prompt's lines",
                                         elem_id="grid-files")
                with gr.Row():
                    run_files = gr.Button("Use all saves next to file 1", elem_id="grid-run-files")
                    grid_strengths = gr.Textbox(value="0, 0.5, 1", label="Strengths (columns)", elem_id="grid-strengths")
                    grid_seeds = gr.Textbox(value="-1", label="Seeds (columns; -1 = one random seed)", elem_id="grid-seeds")
                grid_go = gr.Button("Make grid", variant="primary", elem_id="grid-go")
        with gr.Column(scale=2):
            message = gr.Markdown(elem_id="gen-message")
            gallery = gr.Gallery(label="Images (saved in outputs/generated)", columns=2, height=420,
                                 object_fit="contain", elem_id="gen-gallery", format="png")
            params_box = gr.Textbox(label="PNG parameters (A1111 'PNG Info')", lines=4, elem_id="gen-params",
                                    interactive=False)
            files_out = gr.JSON(visible=False)

    slot_inputs = [c for slot in slots for c in slot]
    common = [model, prompt, negative, steps, guidance, width, height, scheduler]

    def _adapters(vals) -> list[tuple]:
        n = len(slots[0])
        return [tuple(vals[i:i + n]) for i in range(0, len(vals), n)]

    def on_generate(*vals):
        model_v, prompt_v, neg_v, steps_v, guid_v, w_v, h_v, sched_v, seed_v, count_v, *slot_vals, base_v = vals
        try:
            res = gen.generate(model_v, _adapters(slot_vals), prompt_v or "", negative_prompt=neg_v or "",
                               steps=int(steps_v or DEFAULT_STEPS), guidance=_guidance(guid_v),
                               seed=int(seed_v if seed_v is not None else -1), width=int(w_v or 0) or None,
                               height=int(h_v or 0) or None, scheduler=sched_v, num_images=max(1, int(count_v or 1)),
                               base_weight_dtype=base_v or "auto")
        except Exception as e:  # noqa: BLE001 - every failure is shown, the queue keeps running
            return _error(e), gr.skip(), gr.skip(), gr.skip()
        msg = f"Saved {len(res)} image(s): " + ", ".join(f"`{Path(p).name}`" for p, _, _ in res) + f" in `{Path(res[0][0]).parent}`"
        return msg, [(p, c) for p, c, _ in res], res[0][2], [p for p, _, _ in res]

    def on_grid(*vals):
        (model_v, prompt_v, neg_v, steps_v, guid_v, w_v, h_v, sched_v, files_v, strengths_v, seeds_v, first_file,
         base_v) = vals
        files = list(files_v or []) or ([first_file] if first_file else [])
        try:
            strengths, seeds = parse_strengths(strengths_v), parse_seeds(seeds_v)
        except ValueError as e:
            return _error(e), gr.skip(), gr.skip(), gr.skip()
        return _draw(model_v, files, strengths, seeds, prompt_v, neg_v, steps_v, guid_v, w_v, h_v, sched_v, base_v)

    def on_style_grid(*vals):
        """The adapter of slot 1 (else the grid's first file), each prompt line against STRENGTH_SWEEP, one seed."""
        model_v, prompt_v, neg_v, steps_v, guid_v, w_v, h_v, sched_v, seed_v, first_file, files_v, base_v = vals
        files = [first_file] if first_file else list(files_v or [])[:1]
        if not files:
            return _error(ValueError("put the adapter in LoHA file 1 for its style-vs-strength grid")), gr.skip(), \
                gr.skip(), gr.skip()
        return _draw(model_v, files, list(STRENGTH_SWEEP), [int(seed_v if seed_v is not None else -1)], prompt_v,
                     neg_v, steps_v, guid_v, w_v, h_v, sched_v, base_v)

    def _draw(model_v, files, strengths, seeds, prompt_v, neg_v, steps_v, guid_v, w_v, h_v, sched_v, base_v):
        try:
            gpath, cells = gen.grid(model_v, files, strengths, seeds, prompt_v or "",
                                    negative_prompt=neg_v or "", steps=int(steps_v or DEFAULT_STEPS),
                                    guidance=_guidance(guid_v), width=int(w_v or 0) or None,
                                    height=int(h_v or 0) or None, scheduler=sched_v, base_weight_dtype=base_v or "auto")
        except Exception as e:  # noqa: BLE001 - every failure is shown, the queue keeps running
            return _error(e), gr.skip(), gr.skip(), gr.skip()
        with Image.open(gpath) as im:
            params = im.info.get("parameters", "")
        # the grid opens large (a thumbnail would crop its labels); its cells follow it in the gallery
        images = gr.Gallery(value=[(gpath, "grid")] + [(p, c) for p, c, _ in cells], selected_index=0)
        return (f"Grid saved: `{gpath}` ({len(cells)} cells, each saved too)", images, params,
                [gpath] + [p for p, _, _ in cells])

    def on_refresh():
        ch = _choices(policy)
        return (gr.update(choices=policy.model_choices()), *[gr.update(choices=ch) for _ in range(N_SLOTS)],
                gr.update(choices=ch))

    def on_run_files(first_file):
        try:
            p = policy.check_adapter(first_file, what="LoHA file 1")
        except PathRefused as e:
            return _error(e), gr.skip()
        sibs = sorted(str(q) for q in p.parent.glob("*.safetensors") if q.is_file())
        return f"{len(sibs)} files from `{p.parent}`", gr.update(value=sibs, choices=_choices(policy))

    def on_select(evt: gr.SelectData):
        v = evt.value
        caption = v.get("caption") if isinstance(v, dict) else None
        path = None
        if isinstance(v, dict):
            img = v.get("image") or {}
            path = img.get("path") if isinstance(img, dict) else None
        if path and Path(path).is_file():
            with Image.open(path) as im:
                return im.info.get("parameters", caption or "")
        return caption or ""

    go.click(on_generate, common + [seed, count] + slot_inputs + [base_dtype], [message, gallery, params_box, files_out],
             api_name="generate", concurrency_limit=1, concurrency_id="generation")
    grid_go.click(on_grid, common + [grid_files, grid_strengths, grid_seeds, slots[0][0], base_dtype],
                  [message, gallery, params_box, files_out], api_name="grid", concurrency_limit=1,
                  concurrency_id="generation")
    style_go.click(on_style_grid, common + [seed, slots[0][0], grid_files, base_dtype],
                   [message, gallery, params_box, files_out], api_name="style_grid", concurrency_limit=1,
                   concurrency_id="generation")
    refresh.click(on_refresh, None, [model, *[s[0] for s in slots], grid_files], api_name=False)
    run_files.click(on_run_files, slots[0][0], [message, grid_files], api_name=False)
    gallery.select(on_select, None, params_box, api_name=False)
    return {"refresh": (on_refresh, [model, *[s[0] for s in slots], grid_files]), "generator": gen, "slots": slots}


def block_weights_box(elem_id: str, **kw: Any):
    """A block-weights input: one of LoRA Block Weight's presets or 12/17/20/26 numbers typed in; empty = none."""
    import gradio as gr

    return gr.Dropdown(choices=list(PRESETS), value=None, allow_custom_value=True, label="block weights (lbw)",
                       info="empty = every block 1; a preset or 12/17/20/26 numbers", elem_id=elem_id, **kw)


def _guidance(value: float | None) -> float:
    """An emptied guidance box means the default; 0 is a real choice (no guidance)."""
    return DEFAULT_GUIDANCE if value is None else float(value)


def _error(e: BaseException) -> str:
    from .runner import describe_error

    return f"**Cannot generate:**\n\n```text\n{describe_error(e) if not isinstance(e, (PathRefused, ValueError)) else e}\n```"
