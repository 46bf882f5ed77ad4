#!/usr/bin/env python
"""LoHA against LoRA and LoCon at equal trainable parameters, trained the same way on the toy base `toy-sd1`, as a
rank sweep; the style against the subject at each strength; the demo recipe's variants for keeping the subject.

    OMP_NUM_THREADS=1 python bench/bench_styles.py --out /tmp/bench_styles      # the full run (hours on 1 thread)
    python bench/bench_styles.py --results /tmp/a/runs.jsonl,/tmp/b/runs.jsonl --plot docs/style-vs-subject.png

The claim under test (FedPara; LyCORIS): LoHA gives more capacity per parameter than LoRA. Every method is
trained by the same loop, sd-loha's `Trainer`, on the same data, captions, steps, batch, LR schedule, loss,
seeds and noise; only `_setup_network` differs (`BenchTrainer` below): sd-loha's own LoHA (`add_loha`), or a
network of the real LyCORIS package (lycoris-lora) on exactly the layers sd-loha's targets select.

Methods (`METHODS`, the one table, made by `_rank_pairs`): pairs that cover the same layers with equal parameters,
because LoHA of rank r has the parameters of LoRA of rank 2r on every layer (linear: 2r(in+out); 3x3 conv:
2r(out + 9 in)):

- "loha-rR" (sd-loha, rank R) against "lora-r2R" (LyCORIS LoRA): the "full" preset's linear layers and 1x1 convs
  (attention, feed-forward, proj_in/out, time embedding projections, shortcuts; CLIP attention + MLP);
- "loha-conv-rR" (sd-loha, conv rank R/2) against "locon-r2R" (LyCORIS LoRA, conv rank R): the same plus the
  resnets' and samplers' 3x3 convs ("loha-conv-r8" is the demo recipe's network);
- "lyco-loha-conv-r8" (LyCORIS LoHA, as "loha-conv-r8"): a cross-check of sd-loha's LoHA against LyCORIS's.

alpha = rank/2 for all (conv alpha = conv rank/4), so each pair has the same alpha/rank scale.

Styles (`STYLES`): "poster", the bundled posters (16 training, 4 held-out, their toy-grammar `.caption` files),
measured by `frame_contrast`, content by `object_color`; "hatch", toy-world scenes with diagonal stripes on the
background (`sd_loha.toy.styles.hatched_set`: 16 training, 8 held-out scenes, written under --out), measured by
`hatch_amplitude`, content by `judge(...).color`.

Learning rates: each method is trained on "poster" at each of `--lrs` (seed 0), and keeps the one with the lower
held-out loss for the other seeds and for "hatch" (so hatch's figures are out of sample for that choice).

Per run: the held-out denoising loss (plain epsilon MSE, the same noise and timesteps for every run and for the
base model) and, on a fixed prompt set with two fixed seeds per prompt (20 Euler steps, guidance 4), at strengths
0.25, 0.5, 0.75 and 1: the style measure, the fraction of pictures with an object drawn, and the fraction whose
object color is the prompt's. The base model's pictures give strength 0.

Recipes (`RECIPES`, --recipes): the shipped demo recipe (train_configs/demo.toml) with one change each (text
encoder frozen, half alpha, the base model's own pictures of the training captions as regularization images),
trained and measured as above at the demo's own learning rate.

The log (runs.jsonl under --out) gets one row per finished run and one per session (machine, versions, wall
time); a rerun with the same --out continues; the tables and the plot come from the logs (bench/styles_report.py).
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from sd_loha.grid import STRENGTH_SWEEP
from sd_loha.toy import evaluate, measure, styles, world
from sd_loha.train.loop import Trainer

from runlog import bench_parser, log_row, logged_rows, logged_session  # noqa: E402  (bench/, next to this file)

ASSETS = REPO / "sd_loha" / "assets"
GEN_STEPS, GUIDANCE = 20, 4.0
GEN_SEEDS = (0, 1)  # two pictures per prompt: the subject scores move in steps of 1/24, not 1/12
HELDOUT_DRAWS, HELDOUT_SEED = 32, 1234  # (noise, timestep) draws per held-out image, identical for every run
NOISE_SEED_OFFSET = 7919  # reseed after the network is built: every method then sees the same noise and timesteps
DEFAULT_LRS = (2e-3, 6e-3)  # bracket the demo's 4e-3 for LoHA

# The demo recipe (train_configs/demo.toml on toy-sd1), minus what differs per method, style or seed.
RECIPE: dict[str, Any] = dict(
    pretrained_model="toy-sd1", caption_extension=".caption", shuffle_caption=False, resolution=64,
    min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=64, cache_latents=True,
    flip_aug=False,  # a mirrored picture turns "/" hatching into "\": not the style
    preset="full", train_text_encoder=True, train_batch_size=4, max_train_steps=300, lr_scheduler="cosine",
    lr_warmup_steps=20, min_snr_gamma=5.0, save_state=False, save_precision="float", log_with="none",
    sample_prompts=[], overwrite=True,
)
TE_LR_RATIO = 8  # text_encoder_lr = learning_rate / 8 (the demo's 4e-3 / 5e-4)


@dataclass(frozen=True)
class Method:
    library: str  # "sd-loha" | "lycoris"
    algo: str  # "loha" | "lora" (LyCORIS's LoRA is LoCon once convs are targeted)
    rank: int
    alpha: float
    conv_rank: int = 0  # 0: no 3x3 convs
    conv_alpha: float = 1.0
    pair: str = ""  # the method it is compared with (same layers, same parameter count)


def _rank_pairs(ranks: tuple[int, ...], conv_ranks: tuple[int, ...]) -> dict[str, Method]:
    """LoHA rank r against LoRA rank 2r (equal parameters on every layer), alpha = rank / 2; with convs, LoHA
    conv rank r/2 against LoCon conv rank r, conv alpha = conv rank / 4 (the alpha/rank scales match within a
    pair). The rank sweep asks where, if anywhere, LoHA's higher reachable rank pays: the smaller the rank
    budget against the layer width, the more FedPara's argument should hold."""
    out: dict[str, Method] = {}
    for r in ranks:
        out[f"loha-r{r}"] = Method("sd-loha", "loha", r, r / 2, pair=f"lora-r{2 * r}")
        out[f"lora-r{2 * r}"] = Method("lycoris", "lora", 2 * r, r, pair=f"loha-r{r}")
    for r in conv_ranks:
        out[f"loha-conv-r{r}"] = Method("sd-loha", "loha", r, r / 2, r // 2, r / 8, pair=f"locon-r{2 * r}")
        out[f"locon-r{2 * r}"] = Method("lycoris", "lora", 2 * r, r, r, r / 4, pair=f"loha-conv-r{r}")
    return out


METHODS: dict[str, Method] = {
    **_rank_pairs((2, 4, 8), (2, 4, 8)),
    "lyco-loha-conv-r8": Method("lycoris", "loha", 8, 4.0, 4, 1.0, pair="loha-conv-r8"),  # LyCORIS's own LoHA
}
# The rank sweep run by default: the linear pairs at three ranks, the conv pairs at both ends.
DEFAULT_METHODS = ("loha-r2", "lora-r4", "loha-r4", "lora-r8", "loha-r8", "lora-r16",
                   "loha-conv-r2", "locon-r4", "loha-conv-r8", "locon-r16")
STRENGTHS = tuple(s for s in STRENGTH_SWEEP if s)  # the style-against-subject curve (0 is the base row)


# ---- styles: data, prompts, measures -------------------------------------------------------------------

@dataclass(frozen=True)
class Style:
    measure: Callable[[np.ndarray], float]
    scenes: tuple[world.Scene, ...]  # the prompts pictures are generated for
    subject: Callable[[np.ndarray], str]  # the object's color name, "none" where no object is drawn


POSTER_COLORS = ("red", "blue", "yellow")  # colors of the posters' palette (the prompts ask for these)
STYLES: dict[str, Style] = {
    "poster": Style(styles.frame_contrast,
                    tuple(world.Scene(c, s, b) for c, s, b in itertools.product(
                        POSTER_COLORS, ("circle", "square"), ("white", "orange"))),
                    lambda img: styles.object_color(img, POSTER_COLORS)),
    "hatch": Style(styles.hatch_amplitude, tuple(measure.prompt_set(12)), lambda img: measure.judge(img).color),
}
HATCH_TRAIN, HATCH_HELDOUT, HATCH_SEED = 16, 8, 0


def _write_pictures(folder: Path, pictures: list[tuple[np.ndarray, str]]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, caption) in enumerate(pictures):
        Image.fromarray(img).save(folder / f"hatch_{i:02d}.png")
        (folder / f"hatch_{i:02d}.caption").write_text(caption + "\n", encoding="utf-8")
    return folder


def style_folders(style: str, root: Path) -> tuple[Path, Path]:
    """(training folder, held-out folder) of a style; the hatch pictures are drawn into `root` (seeded)."""
    if style == "poster":
        return ASSETS / "demo_images", ASSETS / "demo_images_heldout"
    if style == "hatch":
        return (_write_pictures(root / "hatch" / "train", styles.hatched_set(HATCH_TRAIN, HATCH_SEED)),
                _write_pictures(root / "hatch" / "heldout",
                                styles.hatched_set(HATCH_HELDOUT, HATCH_SEED, skip=HATCH_TRAIN)))
    raise ValueError(f"unknown style {style!r}; choose from {', '.join(STYLES)}")


# ---- LyCORIS networks on sd-loha's targets ---------------------------------------------------------------

@contextlib.contextmanager
def _lycoris_preset(names: list[str]) -> Iterator[None]:
    """LyCORIS reads its targets from class attributes of LycorisNetwork: target exactly `names` (module
    paths), nothing by class, and put the attributes back afterwards."""
    from lycoris import LycorisNetwork

    keys = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
            "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {k: getattr(LycorisNetwork, k) for k in keys}
    LycorisNetwork.apply_preset({"enable_conv": True, "target_module": [], "target_name": names,
                                 "module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False,
                                 "exclude_name": []})
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(LycorisNetwork, k, v)


class LycorisAdapter:
    """LyCORIS networks on a pipeline's UNet and text encoder, with the handful of LoHANetwork methods the
    Trainer calls (parameters, groups, multiplier, save, remove)."""

    def __init__(self, pipe: Any, method: Method, text_encoder: bool) -> None:
        from lycoris import create_lycoris

        from sd_loha.targets import select_targets

        models = {"unet": pipe.unet, "te": pipe.text_encoder} if text_encoder else {"unet": pipe.unet}
        self.nets: dict[str, Any] = {}
        for part, model in models.items():
            targets = select_targets(model, part=part, prefix=f"lora_{part}", preset=RECIPE["preset"],
                                     rank=method.rank, alpha=method.alpha, conv_rank=method.conv_rank,
                                     conv_alpha=method.conv_alpha)
            with _lycoris_preset([t.path for t in targets]):
                net = create_lycoris(model, 1.0, linear_dim=method.rank, linear_alpha=method.alpha,
                                     conv_dim=method.conv_rank, conv_alpha=method.conv_alpha, algo=method.algo)
            if len(net.loras) != len(targets):
                raise RuntimeError(f"LyCORIS built {len(net.loras)} {method.algo} modules on the {part}, sd-loha's "
                                   f"targets are {len(targets)} layers: the comparison would not cover the same layers")
            net.apply_to()
            self.nets[part] = net

    @property
    def modules(self) -> list[SimpleNamespace]:
        """LoHANetwork's view of its adapter modules (each as `.layer`, holding its own tensors), which the
        trainer's memory estimate reads to tell adapter tensors from the base's."""
        return [SimpleNamespace(layer=m) for net in self.nets.values() for m in net.loras]

    def parameters(self, part: str | None = None) -> list[torch.nn.Parameter]:
        return [p for name, net in self.nets.items() if part in (None, name) for p in net.parameters()
                if p.requires_grad]

    def param_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict[str, Any]]:
        groups = [{"params": self.parameters("unet"), "lr": unet_lr, "name": "unet"},
                  {"params": self.parameters("te"), "lr": text_encoder_lr, "name": "text_encoder"}]
        return [g for g in groups if g["params"]]

    def set_multiplier(self, multiplier: float) -> None:
        for net in self.nets.values():
            net.set_multiplier(float(multiplier))

    def summary(self) -> str:
        layers = ", ".join(f"{part}: {len(net.loras)}" for part, net in self.nets.items())
        return f"LyCORIS network: {layers} layers, {sum(p.numel() for p in self.parameters()):,} trainable parameters"

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {f"{part}.{k}": (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu()
                for part, net in self.nets.items() for k, v in net.state_dict().items()}

    def save(self, path: Path, metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict(dtype).items()}, str(path))
        return Path(path)

    def remove(self) -> None:
        for net in self.nets.values():
            net.restore()


def method_overrides(method: Method) -> dict[str, Any]:
    """The config's network options (sd-loha reads them; LycorisAdapter reads the Method)."""
    return dict(network_dim=method.rank, network_alpha=method.alpha, conv_dim=method.conv_rank,
                conv_alpha=method.conv_alpha)


# ---- the runs -----------------------------------------------------------------------------------------------

def heldout_items(folder: Path) -> list[tuple[torch.Tensor, str]]:
    """(pixels (3, 64, 64) in [-1, 1], caption) for each image of a folder with `.caption` files."""
    from sd_loha.data.buckets import resize_and_crop
    from sd_loha.data.images import load_image

    items = []
    for path in sorted(p for p in folder.iterdir() if p.suffix == ".png"):
        pixels = resize_and_crop(load_image(path), (world.SIZE, world.SIZE))[0]
        items.append((pixels, path.with_suffix(".caption").read_text(encoding="utf-8").strip()))
    if not items:
        raise FileNotFoundError(f"no .png images in held-out folder {folder}")
    return items


@torch.no_grad()
def heldout_loss(pipe: Any, items: list[tuple[torch.Tensor, str]], dtype: torch.dtype | None = None) -> float:
    """Mean epsilon MSE of the pipeline (as it is: adapter on or off) on the held-out images; the noise and
    timesteps come from a generator with a fixed seed, so every run and the base model see the same ones.
    `dtype`: the UNet's compute dtype where it is not fp32 (a bf16 run)."""
    vae = pipe.vae
    latents = vae.encode(torch.stack([x for x, _ in items]).to(vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
    cond = pipe.encode_prompt([c for _, c in items], pipe.device, 1, False)[0]
    return evaluate.denoising_mse(pipe, latents, cond, draws=HELDOUT_DRAWS, seed=HELDOUT_SEED, dtype=dtype)


def subject_scores(style: str, images: list[np.ndarray], scenes: list[world.Scene]) -> dict[str, float]:
    """What the style leaves of the subject: the fraction of pictures with an object drawn at all ("drawn") and
    with the prompt's object color ("content")."""
    colors = [STYLES[style].subject(im) for im in images]
    return {"drawn": statistics.mean(float(c != "none") for c in colors),
            "content": statistics.mean(float(c == sc.color) for c, sc in zip(colors, scenes))}


def picture_scores(pipe: Any, style: str, trigger: str = "") -> dict[str, Any]:
    """The style measure and the subject scores on the style's prompt set (two fixed seeds per prompt), with the
    run's trigger word in front of each prompt where it trained with one."""
    spec = STYLES[style]
    pipe.set_progress_bar_config(disable=True)
    images = [im for seed in GEN_SEEDS for im in evaluate.generate(pipe, list(spec.scenes), seed, steps=GEN_STEPS,
                                                                    guidance=GUIDANCE, trigger=trigger)]
    values = [spec.measure(im) for im in images]
    return {"measure": statistics.mean(values), **subject_scores(style, images, list(spec.scenes) * len(GEN_SEEDS)),
            "measure_per_picture": values}


def strength_curve(pipe: Any, network: Any, style: str, trigger: str = "") -> dict[str, dict[str, float]]:
    """picture_scores at each of STRENGTHS (the network's multiplier; set back to 1 afterwards)."""
    curve = {}
    for strength in STRENGTHS:
        network.set_multiplier(strength)
        scores = picture_scores(pipe, style, trigger)
        curve[f"{strength:g}"] = {k: scores[k] for k in ("measure", "drawn", "content")}
    network.set_multiplier(1.0)
    return curve


class BenchTrainer(Trainer):
    """sd-loha's Trainer with the network of `method`, measured at the end of training (before the run
    removes it)."""

    def __init__(self, *args: Any, method: Method, style: str, heldout: list[tuple[torch.Tensor, str]],
                 measure_pictures: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.method, self.style, self.heldout = method, style, heldout
        self.measure_pictures = measure_pictures
        self.scores: dict[str, Any] = {}

    def _setup_network(self) -> None:
        if self.method.library == "sd-loha":
            super()._setup_network()
        else:
            self.network = LycorisAdapter(self.pipe, self.method, self.cfg.train_text_encoder)
            self.params = self.network.parameters()
            self._print(self.network.summary())
            self._set_train_mode(True)
        # The networks draw different amounts of randomness to initialise: reseed so that every method trains on
        # the same noise and timesteps (the batches already follow the data seed).
        torch.manual_seed(self.cfg.seed + NOISE_SEED_OFFSET)

    def _finish(self, stopped: bool):
        self._set_train_mode(False)
        self.scores = {"params_unet": sum(p.numel() for p in self.network.parameters("unet")),
                       "params_te": sum(p.numel() for p in self.network.parameters("te")),
                       "heldout_loss": heldout_loss(self.pipe, self.heldout, self.weight_dtype)}
        if self.measure_pictures:
            self.scores["curve"] = strength_curve(self.pipe, self.network, self.style, self.cfg.trigger_word)
            self.scores.update(self.scores["curve"]["1"])  # the strength-1 figures, as the tables read them
        return super()._finish(stopped)


def _train(settings: dict[str, Any], out: Path, method: Method, style: str, heldout_dir: Path, *,
           measure_pictures: bool = True,
           trainer_class: Callable[..., BenchTrainer] | None = None) -> dict[str, Any]:
    """Train one config (validated and checked as the CLI does) with the method's network; the figures every run
    logs: steps, final training loss, seconds, and the trainer's scores."""
    from sd_loha.train.checks import check_output_dir, check_paths
    from sd_loha.train.config import as_config
    from sd_loha.train.runtime import StopFlag

    cfg = as_config({**settings, "output_dir": str(out)})
    check_paths(cfg)
    check_output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    trainer = (trainer_class or BenchTrainer)(cfg, out, progress=False, method=method, style=style,
                                              heldout=heldout_items(heldout_dir), measure_pictures=measure_pictures)
    trainer.setup()
    with StopFlag(None) as stop:
        if trainer.train(stop).stopped:  # Ctrl-C: a shorter run's figures must not enter the log
            raise SystemExit(f"stopped during {out.name}; rerun with the same --out to continue")
    return {"steps": cfg.max_train_steps, "final_train_loss": statistics.mean(trainer.losses[-20:]),
            "seconds": round(time.time() - started, 1), **trainer.scores}


def run_one(name: str, style: str, seed: int, lr: float, root: Path, *, steps: int | None = None,
            measure_pictures: bool = True, options: dict[str, Any] | None = None, tag: str = "",
            trainer_class: Callable[..., BenchTrainer] | None = None) -> dict[str, Any]:
    """Train one (method, style, seed, learning rate) and return its figures. `options`: config settings on top
    of the recipe (its own run folder, named by `tag`); `trainer_class`: a BenchTrainer that measures more."""
    method = METHODS[name]
    train_dir, heldout_dir = style_folders(style, root)
    settings = {**RECIPE, **method_overrides(method), "train_data_dir": str(train_dir), "output_name": name,
                "learning_rate": lr, "text_encoder_lr": lr / TE_LR_RATIO, "seed": seed,
                **({"max_train_steps": steps, "lr_warmup_steps": 0} if steps is not None else {}), **(options or {})}
    out = root / "runs" / f"{style}-{name}{tag}-lr{lr:g}-seed{seed}"
    return {"method": name, "style": style, "seed": seed, "lr": lr,
            **_train(settings, out, method, style, heldout_dir, measure_pictures=measure_pictures,
                     trainer_class=trainer_class)}


# ---- the shipped demo recipe and its variants: what keeps the subject at strength 1 ----------------------------

DEMO_CONFIG = REPO / "train_configs" / "demo.toml"
TRIGGER = "sks style"  # a rare word (DreamBooth's habit); toy-sd1's grammar has no word for any style
BASE_PICTURES = "base-pictures"  # reg_data_dir placeholder: the base model's own pictures of the training captions
# Each variant changes one thing of the demo recipe (train_configs/demo.toml, as shipped in the commit the log
# names); the curve of each (style and subject against strength) says what keeps the subject.
RECIPES: dict[str, dict[str, Any]] = {
    "demo": {},
    "demo-no-te": {"train_text_encoder": False},
    "demo-half-alpha": {"network_alpha": 4.0, "conv_alpha": 2.0},
    "demo-reg": {"reg_data_dir": BASE_PICTURES, "prior_loss_weight": 1.0},
    # half of each epoch is regularization: twice the steps give the style as many steps as "demo"
    "demo-reg-800": {"reg_data_dir": BASE_PICTURES, "prior_loss_weight": 1.0, "max_train_steps": 800},
    # the style learned under a trigger word (pictures are then drawn with it), alone and with the base model's
    # pictures as regularization images, whose captions stay without it (DreamBooth's prior preservation)
    "demo-trigger": {"trigger_word": TRIGGER},
    "demo-trigger-reg": {"trigger_word": TRIGGER, "reg_data_dir": BASE_PICTURES, "prior_loss_weight": 1.0},
    "demo-reg-0.3": {"reg_data_dir": BASE_PICTURES, "prior_loss_weight": 0.3},  # a lighter pull to the base
    "demo-no-te-half-alpha": {"train_text_encoder": False, "network_alpha": 4.0, "conv_alpha": 2.0},
}


def demo_settings() -> dict[str, Any]:
    from sd_loha.train.config import load_config

    return load_config(DEMO_CONFIG).to_dict(include_none=False)


@torch.no_grad()
def base_pictures(train_dir: Path, folder: Path) -> Path:
    """The base model's own picture of each training caption (generator seed = its index), with the caption:
    regularization images that tell the adapter what the prompts drew before (prior preservation)."""
    from PIL import Image

    from sd_loha.models import load_pipeline

    captions = sorted(train_dir.glob("*.caption"))
    if folder.is_dir() and len(list(folder.glob("*.png"))) == len(captions):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(RECIPE["pretrained_model"])
    pipe.set_progress_bar_config(disable=True)
    for i, path in enumerate(captions):
        caption = path.read_text(encoding="utf-8").strip()
        image = pipe(caption, num_inference_steps=GEN_STEPS, guidance_scale=GUIDANCE, height=world.SIZE,
                     width=world.SIZE, generator=torch.Generator().manual_seed(i)).images[0]
        image.save(folder / f"base_{i:02d}.png")
        (folder / f"base_{i:02d}.caption").write_text(caption + "\n", encoding="utf-8")
    return folder


def run_recipe(variant: str, style: str, seed: int, root: Path) -> dict[str, Any]:
    """Train the demo recipe with one variant's change on a style, and return its figures (as run_one)."""
    train_dir, heldout_dir = style_folders(style, root)
    settings = {**demo_settings(), **RECIPES[variant], "train_data_dir": str(train_dir), "seed": seed,
                "sample_prompts": [], "save_every_n_steps": None, "log_with": "none", "save_state": False}
    if style == "hatch":
        settings["flip_aug"] = False  # a mirror turns "/" hatching into "\": not the style
    if settings.get("reg_data_dir") == BASE_PICTURES:
        settings["reg_data_dir"] = str(base_pictures(train_dir, root / style / "base_pictures"))
    out = root / "runs" / f"{style}-recipe-{variant}-seed{seed}"
    method = Method("sd-loha", "loha", settings["network_dim"], settings["network_alpha"],
                    settings.get("conv_dim", 0), settings.get("conv_alpha", 1.0))
    return {"method": variant, "kind": "recipe", "style": style, "seed": seed, "lr": settings["learning_rate"],
            **_train(settings, out, method, style, heldout_dir)}


def base_row(style: str, root: Path) -> dict[str, Any]:
    """The base model's figures (no adapter, i.e. strength 0) on the style's held-out set and prompts, and the
    style measure on the training pictures as drawn and after toy-sd1's VAE (what an adapter can reach)."""
    from sd_loha.models import load_pipeline

    pipe = load_pipeline(RECIPE["pretrained_model"])
    train_dir, heldout_dir = style_folders(style, root)
    pictures = [((x.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy() for x, _ in heldout_items(train_dir)]
    measure_ = STYLES[style].measure
    return {"method": "base", "style": style, "heldout_loss": heldout_loss(pipe, heldout_items(heldout_dir)),
            "measure_training_pictures": statistics.mean(measure_(im) for im in pictures),
            "measure_after_vae": statistics.mean(measure_(im) for im in evaluate.roundtrip(pipe.vae, pictures)),
            **picture_scores(pipe, style)}


def parameter_counts(names: list[str]) -> dict[str, tuple[int, int]]:
    """(UNet, text encoder) trainable parameters of each method on a fresh toy-sd1, without training."""
    from sd_loha import add_loha
    from sd_loha.models import load_pipeline

    counts = {}
    for name in names:
        m = METHODS[name]
        pipe = load_pipeline(RECIPE["pretrained_model"])
        if m.library == "sd-loha":
            net = add_loha(pipe, preset=RECIPE["preset"], rank=m.rank, alpha=m.alpha, conv_rank=m.conv_rank,
                           conv_alpha=m.conv_alpha, text_encoder=True)
        else:
            net = LycorisAdapter(pipe, m, text_encoder=True)
        counts[name] = (sum(p.numel() for p in net.parameters("unet")), sum(p.numel() for p in net.parameters("te")))
        net.remove()
    return counts


# ---- the whole bench ------------------------------------------------------------------------------------------

def run_bench(root: Path, names: list[str], styles_: list[str], seeds: list[int], lrs: list[float],
              recipes: list[str] = ()) -> Path:
    """Parameter counts, base rows, the learning-rate sweep (first style, first seed), then one block of all
    methods and styles per seed, so a run cut short has every method on the same seeds; then the demo recipe's
    variants, one block per seed. Runs already in root/runs.jsonl are not repeated (a rerun with the same --out
    continues)."""
    log = root / "runs.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    rows = logged_rows(log)
    done = {(r["method"], r["style"], r["seed"], r["lr"]): r for r in rows if r.get("kind") == "sweep"}
    done.update({(r["method"], r["style"], r["seed"], r["lr"]): r for r in rows if r.get("kind") == "run"})
    logged_params = {r["method"] for r in rows if r.get("kind") == "params"}
    for name, (unet, te) in parameter_counts([n for n in names if n not in logged_params]).items():
        log_row(log, {"method": name, "kind": "params", "params_unet": unet, "params_te": te})
    for style in styles_:
        if not any(r.get("method") == "base" and r.get("style") == style for r in rows):
            log_row(log, base_row(style, root))
    chosen = {}
    for name in names:
        sweep = []
        for lr in lrs:
            key = (name, styles_[0], seeds[0], lr)
            if key not in done:
                done[key] = run_one(name, styles_[0], seeds[0], lr, root)
                log_row(log, {**done[key], "kind": "sweep"})
            sweep.append(done[key])
        best = min(sweep, key=lambda r: r["heldout_loss"])
        chosen[name] = best["lr"]
        if not any(r.get("kind") == "run" and r["method"] == name and r["style"] == styles_[0] and r["seed"] == seeds[0]
                   for r in logged_rows(log)):
            log_row(log, {**best, "kind": "run"})
    for seed, style, name in itertools.product(seeds, styles_, names):
        key = (name, style, seed, chosen[name])
        if key not in done:
            done[key] = run_one(name, style, seed, chosen[name], root)
            log_row(log, {**done[key], "kind": "run"})
    recipes_done = {(r["method"], r["style"], r["seed"]) for r in rows if r.get("kind") == "recipe"}
    for seed, style, variant in itertools.product(seeds, styles_, recipes):
        if (variant, style, seed) not in recipes_done:
            log_row(log, run_recipe(variant, style, seed, root))
    return log


def main(argv: list[str] | None = None) -> None:
    p = bench_parser(__doc__.split("\n\n")[0], Path("/tmp/bench_styles"), "runs, hatch pictures, runs.jsonl")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"of {', '.join(METHODS)} (empty: none)")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"variants of the demo recipe, of {', '.join(RECIPES)} "
                   "(empty: none)")
    p.add_argument("--styles", default=",".join(STYLES), help="the first one picks the learning rates")
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in DEFAULT_LRS), help="tried per method")
    p.add_argument("--plot", type=Path, help="with --results: also draw the style-against-subject curves (PNG)")
    args = p.parse_args(argv)
    if args.results:
        from styles_report import plot_curves, results_tables

        logs = [Path(x) for x in str(args.results).split(",")]
        print(results_tables(logs))
        if args.plot:
            plot_curves(logs, args.plot)
        return
    names = [n for n in args.methods.split(",") if n]
    recipes = [n for n in args.recipes.split(",") if n]
    styles_ = args.styles.split(",")
    for n in names:
        if n not in METHODS:
            p.error(f"--methods: unknown method {n!r}; choose from {', '.join(METHODS)}")
    for n in recipes:
        if n not in RECIPES:
            p.error(f"--recipes: unknown variant {n!r}; choose from {', '.join(RECIPES)}")
    for s in styles_:
        if s not in STYLES:
            p.error(f"--styles: unknown style {s!r}; choose from {', '.join(STYLES)}")
    torch.set_num_threads(args.threads)
    with logged_session(args.out / "runs.jsonl", args.threads):
        log = run_bench(args.out, names, styles_, [int(s) for s in args.seeds.split(",")],
                        [float(x) for x in args.lrs.split(",")], recipes)
    from styles_report import results_tables

    print(results_tables([log]))


if __name__ == "__main__":
    main()
