"""Training-time conditioning equals what the diffusers pipelines feed the UNet at inference."""

from __future__ import annotations

import torch

from sd_loha.data.dataset import TrainDataset, collate_examples
from sd_loha.data.preflight import run_preflight
from sd_loha.models import build_tiny_pipeline
from sd_loha.train.conditioning import Conditioner, sdxl_time_ids

from .helpers import HELDOUT_IMAGES

PROMPTS = ["sdlohastyle, poster, red circle", "a second, longer prompt about teal vertical stripes on a cream background"]


def test_sdxl_time_ids_order_matches_the_pipeline():
    """(orig h, orig w, crop top, crop left, target h, target w) per sample, as SDXL was trained."""
    ids = sdxl_time_ids([(100, 200), (64, 64)], [(10, 20), (0, 0)], [(64, 128), (64, 64)], torch.device("cpu"), torch.float32)
    assert ids.tolist() == [[100, 200, 10, 20, 64, 128], [64, 64, 0, 0, 64, 64]]
    pipe = build_tiny_pipeline("tiny-sdxl")
    theirs = pipe._get_add_time_ids((100, 200), (10, 20), (64, 128), dtype=torch.float32,
                                    text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(ids[:1], theirs, rtol=0, atol=0)


def test_dataset_sizes_are_height_width():
    """The batches the loop turns into time ids carry (h, w) / (top, left): a 128x96 (w x h) image says so."""
    report = run_preflight(HELDOUT_IMAGES, resolution=(64, 64), min_bucket_reso=64, max_bucket_reso=128,
                           bucket_reso_steps=64, batch_size=1)
    ds = TrainDataset(report)
    i = next(i for i, it in enumerate(ds.items) if it.path.name == "heldout_04.png")
    ex = ds[i]
    bw, bh = ds.items[i].bucket
    assert ex["original_size"] == (96, 128)
    assert ex["target_size"] == (bh, bw)
    batch = collate_examples([ex])
    assert batch["original_sizes"].tolist() == [[96, 128]] and batch["target_sizes"].tolist() == [[bh, bw]]


@torch.no_grad()
def test_encode_sdxl_matches_pipeline_encode_prompt():
    pipe = build_tiny_pipeline("tiny-sdxl")
    cond = Conditioner(pipe, sdxl=True, clip_skip=1, train_text_encoder=False)(PROMPTS, torch.device("cpu"))
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    # CLIP-L penultimate (32) ++ CLIP-G penultimate (32); pooled = CLIP-G's projected text embedding
    assert cond["encoder_hidden_states"].shape == (2, 77, 64) and cond["text_embeds"].shape == (2, 32)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["text_embeds"], pooled, rtol=0, atol=0)
    # the two halves really are the two encoders' penultimate layers
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    l_half = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(cond["encoder_hidden_states"][..., :32], l_half, rtol=0, atol=0)
    # clip_skip counts back from the penultimate layer, as diffusers' clip_skip does (ours = theirs + 1)
    skip = Conditioner(pipe, sdxl=True, clip_skip=2, train_text_encoder=False)(PROMPTS, torch.device("cpu"))
    embeds_skip, _, pooled_skip, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                        do_classifier_free_guidance=False, clip_skip=1)
    torch.testing.assert_close(skip["encoder_hidden_states"], embeds_skip, rtol=0, atol=0)
    torch.testing.assert_close(skip["text_embeds"], pooled_skip, rtol=0, atol=0)


@torch.no_grad()
def test_encode_sd_matches_pipeline_encode_prompt():
    for name in ("tiny-sd1", "tiny-sd2"):
        pipe = build_tiny_pipeline(name)
        cond = Conditioner(pipe, sdxl=False, clip_skip=1, train_text_encoder=False)(PROMPTS, torch.device("cpu"))
        embeds, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)



def test_samples_use_the_trained_clip_skip(tmp_path):
    """Sample grids are made with the clip_skip the adapter trains with (the SD pipeline's own clip_skip path
    crashes on transformers 5; SDXL's works): at every denoising step the UNet's conditioning for the prompt is
    the trainer's Conditioner output for that clip_skip, which differs between 1 and 2."""
    from sd_loha.train.config import config_from_kwargs
    from sd_loha.train.sampling import sample_images

    for name in ("tiny-sd1", "tiny-sdxl"):
        pipe = build_tiny_pipeline(name)
        seen = []
        pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"]),
                                            with_kwargs=True)
        wanted = []
        for skip in (1, 2):
            seen.clear()
            cfg = config_from_kwargs(pretrained_model=name, train_data_dir=str(tmp_path), output_dir=str(tmp_path),
                                     resolution=64, min_bucket_reso=64, sample_prompts=["sdlohastyle, poster"], sample_steps=2,
                                     clip_skip=skip)
            sample_images(pipe, cfg)
            want = Conditioner(pipe, sdxl=name == "tiny-sdxl", clip_skip=skip, train_text_encoder=False)(
                ["sdlohastyle, poster"], torch.device("cpu"))["encoder_hidden_states"]
            assert len(seen) == 2, name  # two denoising steps, each with [negative, prompt]
            for states in seen:
                # the sampler may encode the prompt in another batch than the Conditioner: fp32 tolerance
                torch.testing.assert_close(states[-1:], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {skip}: {m}")
            wanted.append(want)
        assert (wanted[0] - wanted[1]).abs().max() > 1e-2, name  # the check above tells the two apart
