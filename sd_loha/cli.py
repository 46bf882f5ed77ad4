"""The `sd-loha` command line. Each subcommand parses its arguments and calls the library function that
does the work (the web UI calls the same functions)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .io import AdapterFileError


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import format_summary, summarize

    summary = summarize(args.file, delta_norms=args.norms)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _cmd_meta(args: argparse.Namespace) -> int:
    from .io import addnet_hash
    from .meta import FIELDS, edit_metadata, format_metadata, read_metadata, thumbnail_data_url

    changes: dict[str, str | None] = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set ss_output_name=my_style")
        changes[key] = value
    for field, key in FIELDS.items():
        value = getattr(args, field)
        if value is not None:
            changes[key] = thumbnail_data_url(value) if field == "thumbnail" else value
    changes.update(dict.fromkeys(args.unset))
    if changes:
        before = addnet_hash(args.file)
        meta = edit_metadata(args.file, changes, out=args.out)
        written = args.out or args.file
        after = addnet_hash(written)
        print(f"wrote {written} (addnet hash {after[:12]}{', unchanged' if after == before else ''})", file=sys.stderr)
    else:
        meta = read_metadata(args.file)
    print(json.dumps(meta, indent=2, ensure_ascii=False) if args.json else format_metadata(meta))
    return 0


#: SD 3.x's classifier-free guidance by kohya variant (models.SD3_VARIANTS): each model card's value (SD3 Medium
#: 7, SD3.5 Medium 4.5, SD3.5 Large 3.5; the flow models draw oversaturated at SD's 7)
SD3_GUIDANCE: dict[str, float] = {"medium": 7.0, "5-medium": 4.5, "5-large": 3.5}


def default_guidance(model: str, family: Any = None) -> float:
    """`generate --guidance` when not given: the toy model's card value (it draws best at 4), an SD 3.x model's
    card value by variant (`family`: the loaded pipeline's models.ModelFamily), else 7 (A1111's and diffusers'
    usual classifier-free guidance for real SD models)."""
    from .models import TOY_MODELS

    if model in TOY_MODELS:
        from .toy.evaluate import GUIDANCE

        return GUIDANCE
    if family is not None and family.is_sd3:
        return SD3_GUIDANCE.get(family.variant, 7.0)
    return 7.0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generate import AdapterSpec, GenerationSession, save_png

    if args.strength_grid and (len(args.loha) != 1 or args.num_images != 1):
        raise ValueError("generate --strength-grid draws one adapter at each strength, one picture per prompt line "
                         "and strength: give exactly one --loha FILE and no --num-images")
    session = GenerationSession(args.model, device=args.device, merge=not args.no_merge,
                                base_weight_dtype=args.base_weight_dtype, base_config=args.base_config)
    specs = [AdapterSpec.parse(s) for s in args.loha]
    out_dir = Path(args.output_dir)
    guidance = default_guidance(args.model, session.family) if args.guidance is None else args.guidance
    if args.strength_grid:
        return _strength_grid(args, session, specs[0], guidance)
    session.set_adapters(specs)
    results = session.generate(args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                               guidance_scale=guidance, width=args.width, height=args.height,
                               scheduler=args.scheduler, num_images=args.num_images)
    for i, (image, params) in enumerate(results):
        seed = params.splitlines()[-1].split("Seed: ")[1].split(",")[0]  # the fields line, not the prompt
        path = save_png(image, out_dir / f"{args.prefix}{i:03d}-{seed}.png", params)
        print(path)
    return 0


def _strength_grid(args: argparse.Namespace, session: Any, spec: Any, guidance: float) -> int:
    """`generate --strength-grid`: the Generate tab's style-vs-strength grid (sd_loha.grid.draw_grid), its cells
    and the grid saved in --output-dir, their paths printed."""
    from .generate import save_png
    from .grid import STRENGTH_SWEEP, draw_grid, prompt_lines

    out_dir = Path(args.output_dir)
    cells: list[Path] = []

    def save(cell: Any) -> None:
        cells.append(save_png(cell.image, out_dir / f"{args.prefix}cell{len(cells):03d}-{cell.seed}.png",
                              cell.parameters))

    grid = draw_grid(session, [spec.path], prompt_lines(args.prompt), STRENGTH_SWEEP, [args.seed],
                     negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=guidance,
                     width=args.width, height=args.height, scheduler=args.scheduler, on_cell=save)
    for path in cells:
        print(path)
    print(save_png(grid.image, out_dir / f"{args.prefix}grid-{grid.cells[0].seed}.png", grid.parameters))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .bake import bake_adapters
    from .generate import AdapterSpec

    report = bake_adapters(args.model, [AdapterSpec.parse(s) for s in args.loha], args.out, args.dtype,
                           progress=(lambda what, _f: print(what, file=sys.stderr)) if args.verbose else None,
                           base_config=args.base_config)
    print(report)
    return 0


def _convert_to_lora(args: argparse.Namespace) -> str:
    from .convert import convert_to_lora_file
    from .network import SAVE_DTYPES

    report = convert_to_lora_file(args.file, args.out, rank=args.rank, energy=args.energy, model=args.model,
                                  dtype=SAVE_DTYPES[args.dtype] if args.dtype else None, form=args.lora_form or "kohya")
    return json.dumps(report.as_dict(), indent=2) if args.json else str(report)


def _convert_to_peft(args: argparse.Namespace) -> str:
    from .peft_format import convert_to_peft

    return "\n".join(str(folder) for folder in convert_to_peft(args.file, args.out, model=args.model).values())


def _convert_to_kohya(args: argparse.Namespace) -> str:
    from .peft_format import convert_to_kohya

    return str(convert_to_kohya(args.file, args.out, model=args.model))


# `sd-loha convert --to TARGET`: target -> (help, function of the parsed arguments returning what to print)
CONVERT_TARGETS = {
    "lora": ("kohya LoRA/LoCon by truncated SVD of each layer's delta (--rank or --energy)", _convert_to_lora),
    "peft": ("PEFT LoHa adapters, one folder per model (OUT/unet, OUT/text_encoder, ...), same factors", _convert_to_peft),
    "kohya": ("a PEFT LoHa adapter folder as a kohya/LyCORIS LoHA file, same factors", _convert_to_kohya),
}


def _cmd_convert(args: argparse.Namespace) -> int:
    if args.to != "lora":
        given = [f"--{k.replace('_', '-')}" for k in ("rank", "energy", "dtype", "lora_form") if getattr(args, k) is not None]
        if given:
            raise ValueError(f"convert --to {args.to}: {', '.join(given)} {'is' if len(given) == 1 else 'are'} for "
                             "--to lora only (this conversion copies the factors as they are); leave them out")
    print(CONVERT_TARGETS[args.to][1](args))
    return 0


def _cmd_webui(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401

        from webui.app import run
    except ImportError as e:
        print(f"error: the web UI needs gradio ({e}); install it with: pip install 'sd-loha[webui]'", file=sys.stderr)
        return 2
    return run(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.loop import train

    resume = True if args.resume == "latest" else args.resume
    config = args.config if args.config else {}  # every option may come from --set
    result = train(config, resume=resume, overrides=args.set)
    if result.stopped:
        return 130  # stopped early on request: resumable, but not a finished run
    return 0 if result.output else 1


def build_parser() -> argparse.ArgumentParser:
    from .grid import STRENGTH_SWEEP
    from .models import TINY_MODELS
    from .schedulers import FLOW_SCHEDULERS, SCHEDULERS
    from .train.lowmem import BASE_DTYPES

    p = argparse.ArgumentParser(prog="sd-loha", description="Train and load LoHA adapters for Stable Diffusion.")
    verbose_help = "log what happens (INFO), and print the traceback of an error"
    base_config_help = ("for a single-file --model: the diffusers folder (or hub id) whose configs and missing components "
                        "complete it (SD 3.x files holding the MMDiT and VAE alone need its text encoders)")
    p.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("inspect", help="show what an adapter file holds")
    q.add_argument("file")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--norms", action="store_true", help="also compute the size of the change per block")
    q.set_defaults(func=_cmd_inspect)

    t = sub.add_parser("train", help="train a LoHA adapter from a TOML config (options: docs/config.md)")
    t.add_argument("--config", help="TOML file; options may also all come from --set")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option, e.g. --set max_train_steps=50 (repeatable)")
    t.add_argument("--resume", nargs="?", const="latest", default=None, metavar="STATE",
                   help="continue from the newest state in output_dir, or from the given state folder")
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="generate images with LoHA adapters merged into a base model")
    g.add_argument("--model", default="toy-sd1",
                   help=f"diffusers folder, .safetensors/.ckpt file, hub id, or {', '.join(TINY_MODELS)}")
    g.add_argument("--loha", action="append", default=[], metavar="FILE[:STRENGTH[:TE_STRENGTH]][:lbw=WEIGHTS]",
                   help="adapter to merge; repeat for several. lbw= sets block weights as LoRA Block Weight does: "
                        "12/17/20/26 comma-separated numbers or a preset (INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, "
                        "ALL, NONE); docs/tools.md")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--seed", type=int, default=-1, help="-1 = random")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance (default: 4 for toy-sd1, which draws best at 4; SD 3.x: its model "
                        "card's, 7 SD3 Medium, 4.5 SD3.5 Medium, 3.5 SD3.5 Large; 7 for other models)")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS),
                   help="sampler (default: euler_a; SD 3.x: euler, its flow-matching Euler; SD 3.x takes "
                        f"{', '.join(FLOW_SCHEDULERS)})")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--strength-grid", action="store_true",
                   help="one labelled grid instead: the --loha file (its strength ignored) at strengths "
                        f"{', '.join(f'{v:g}' for v in STRENGTH_SWEEP)} (columns; 0 is the base model's picture) "
                        "for each line of --prompt (rows), at the one --seed, the adapter in the bypass; the cells "
                        "are saved too (the web UI's 'Style vs strength' button)")
    g.add_argument("--output-dir", default="outputs")
    g.add_argument("--prefix", default="", help="file name prefix")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    g.add_argument("--no-merge", action="store_true",
                   help="add the adapters in the forward (bypass) instead of merging them into the weights: stored "
                        "weights untouched, a little slower per step (quantized or fp8 layers take this path anyway)")
    g.add_argument("--base-config", default=None, metavar="FOLDER", help=base_config_help)
    g.add_argument("--base-weight-dtype", default="auto", choices=BASE_DTYPES,
                   help="store the base's UNet (SD 3.x: transformer) and text encoders (T5 too) in fp8, nf4 or int8 (the training option of that "
                        "name; nf4/int8 need bitsandbytes): less GPU memory; the adapters then take the bypass")
    g.set_defaults(func=_cmd_generate)

    m = sub.add_parser("merge", help="bake LoHA adapters into a base model: a diffusers folder or one .safetensors "
                                     "checkpoint in the original layout (A1111, ComfyUI, from_single_file)")
    m.add_argument("--model", required=True,
                   help=f"base model: diffusers folder, .safetensors/.ckpt file, hub id, or {', '.join(TINY_MODELS)}")
    m.add_argument("--loha", action="append", required=True, metavar="FILE[:STRENGTH[:TE_STRENGTH]][:lbw=WEIGHTS]",
                   help="adapter (a .safetensors file or a PEFT adapter folder) to bake in, at its UNet (and "
                        "text-encoder) strength; repeat for several, applied in order. lbw= sets block weights as "
                        "in generate (LoRA Block Weight's lists and presets; docs/tools.md)")
    m.add_argument("--out", required=True,
                   help="a .safetensors path: single-file checkpoint in the original layout; any other path: diffusers "
                        "folder (never the --model path itself)")
    m.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"),
                   help="weights are merged in fp32 and cast to this once (default fp16)")
    m.add_argument("--base-config", default=None, metavar="FOLDER", help=base_config_help)
    m.set_defaults(func=_cmd_merge)

    c = sub.add_parser("convert", help="convert an adapter file to another format: "
                       + "; ".join(f"--to {k}: {v[0]}" for k, v in CONVERT_TARGETS.items()))
    c.add_argument("file", help="the adapter file (.safetensors), or a PEFT adapter folder")
    c.add_argument("--to", required=True, choices=sorted(CONVERT_TARGETS), help="the format to write")
    c.add_argument("--out", required=True, help="the file to write (--to peft: the folder)")
    c.add_argument("--model", default=None,
                   help="the base model the file was made for: needed when the file's shapes do not say which layers "
                        "are convs (and their kernel), and for DoRA modules")
    c.add_argument("--rank", type=int, default=None, help="--to lora: the rank of every layer (clipped to its full rank)")
    c.add_argument("--energy", type=float, default=None,
                   help="--to lora: per layer, the smallest rank keeping this fraction of the squared singular values")
    c.add_argument("--dtype", default=None, choices=("fp16", "bf16", "fp32"),
                   help="--to lora: dtype of the written factors (default: the source file's); refused with peft/kohya, "
                        "like --rank and --energy")
    c.add_argument("--lora-form", default=None, choices=("kohya", "diffusers"),
                   help="--to lora, SD 3.x files: kohya (default; kohya sd-scripts, ComfyUI, Forge: the original MMDiT "
                        "layout, fused qkv) or diffusers (StableDiffusion3Pipeline.load_lora_weights, PEFT)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=_cmd_convert)

    e = sub.add_parser("meta", help="show or edit an adapter file's metadata (title, trigger words, description, "
                                    "thumbnail, any ss_*/modelspec.* key) without touching its tensors")
    e.add_argument("file")
    e.add_argument("--title", help="set modelspec.title")
    e.add_argument("--trigger", help="set modelspec.trigger_phrase (the words that call the style, e.g. 'mystyle')")
    e.add_argument("--description", help="set modelspec.description")
    e.add_argument("--thumbnail", metavar="IMAGE", help="set modelspec.thumbnail to this PNG (or JPEG/WebP) as a data URL")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set any metadata key (repeatable)")
    e.add_argument("--unset", action="append", default=[], metavar="KEY", help="remove a metadata key (repeatable)")
    e.add_argument("--out", help="write the edited file here instead of replacing FILE")
    e.add_argument("--json", action="store_true", help="print the metadata as JSON, values in full")
    e.set_defaults(func=_cmd_meta)

    w = sub.add_parser("webui", help="the web UI: train, generate and inspect in the browser (docs/webui.md)")
    try:
        from webui.app import add_arguments
    except ImportError:  # gradio not installed: `sd-loha webui` then says how to install it
        w.add_argument("rest", nargs=argparse.REMAINDER)
    else:
        add_arguments(w)
    w.set_defaults(func=_cmd_webui)
    for command in sub.choices.values():  # -v after the subcommand too; SUPPRESS keeps a -v given before it
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (AdapterFileError, OSError, ValueError, KeyError, RuntimeError) as e:
        if args.verbose:  # where it happened, for a bug report
            import traceback

            traceback.print_exc()
        # a KeyError's str() is the repr of its message ('foo' in quotes): print the message itself
        message = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else e
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
