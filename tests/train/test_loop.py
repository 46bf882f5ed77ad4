"""The training loop end to end on the tiny SD1 model: resume, stop, divergence, output-folder safety,
validation, EMA, epochs/rotation, option paths (min-SNR, Huber, noise offset, checkpointing, accumulation),
text-embedding caching."""

from __future__ import annotations

import pytest
import torch

from sd_loha import add_loha
from sd_loha.models import build_tiny_pipeline
from sd_loha.train import loop as loop_mod
from sd_loha.train.config import ConfigError
from sd_loha.train.events import Done, Progress
from sd_loha.train.loop import TrainingError, train
from sd_loha.train.state import load_state

from .helpers import assert_finite_file, base_config, read_file, stop_at_step

# Resume must reproduce the uninterrupted run. On one machine and thread count every kernel is deterministic
# and the state holds everything (fp32 factors, AdamW moments, scheduler, RNG, data position), so the files
# come out bit-identical; the bound leaves room for other BLAS builds only.
RESUME_ATOL = 1e-6


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _untrained(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Modules whose zero-initialised factor (hada_w2_a) never moved: they got no gradient."""
    return sorted(k for k, t in tensors.items() if k.endswith("hada_w2_a") and not t.abs().sum())


def _resume_config(out, **kw):
    # AdamW moments, a cosine schedule with warmup, shuffled batches, flips, caption shuffle and rank dropout:
    # losing any of optimizer state, schedule position, data position or RNG state changes the result.
    return base_config(out, max_train_steps=6, train_batch_size=4, save_every_n_steps=3, save_state=True,
                       lr_scheduler="cosine", lr_warmup_steps=2, flip_aug=True, shuffle_caption=True,
                       rank_dropout=0.1, **kw)


def test_resume_equals_uninterrupted_run(tmp_path):
    full = train(_resume_config(tmp_path / "full"), progress=False)
    state3 = tmp_path / "full" / "state-00000003"
    assert full.steps == 6 and state3.is_dir() and (tmp_path / "full" / "loha-step000003.safetensors").is_file()
    assert load_state(state3)["progress"]["step"] == 3
    assert load_state(state3)["optimizer"]["state"], "the state must hold AdamW's moments"

    # 16 images / batch 4 = 4 steps per epoch: the resumed part crosses an epoch boundary at step 4
    resumed = train(_resume_config(tmp_path / "resumed"), resume=str(state3), progress=False)
    assert resumed.steps == 6 and not resumed.stopped
    a, _ = read_file(full.output)
    b, meta = read_file(resumed.output)
    diff = _max_diff(a, b)
    print(f"resume vs uninterrupted: max |diff| = {diff:.3g}")
    assert diff <= RESUME_ATOL
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)  # the whole curve, restored + new
    assert meta["ss_steps"] == "6" and meta["ss_epoch"] == "2"
    csv = (tmp_path / "resumed" / "loss.csv").read_text().splitlines()
    assert csv[0] == "step,loss" and [r.split(",")[0] for r in csv[1:]] == ["1", "2", "3", "4", "5", "6"]

    # The same resume with AdamW's moments dropped lands elsewhere: the test can see a lost optimizer state.
    doctored = tmp_path / "doctored-state"
    import shutil

    shutil.copytree(state3, doctored)
    opt = torch.load(doctored / "optimizer.pt", weights_only=True)
    opt["optimizer"]["state"] = {}
    torch.save(opt, doctored / "optimizer.pt")
    lost = train(_resume_config(tmp_path / "lost"), resume=str(doctored), progress=False)
    c, _ = read_file(lost.output)
    assert _max_diff(a, c) > 100 * RESUME_ATOL


def test_stop_saves_adapter_and_state_then_resume_finishes(tmp_path):
    stop, events, on_event = stop_at_step(2)
    cfg = base_config(tmp_path / "out", max_train_steps=5, save_state=True)
    result = train(cfg, on_event=on_event, stop_event=stop, progress=False)
    assert result.stopped and result.steps == 2
    assert result.output == tmp_path / "out" / "loha-step000002.safetensors" and result.output.is_file()
    assert_finite_file(result.output)
    assert (tmp_path / "out" / "state-00000002" / "progress.json").is_file()
    assert not (tmp_path / "out" / "loha.safetensors").exists()
    assert events[-1] == Done(output=str(result.output), stopped=True, step=2)

    finished = train(cfg, resume=True, progress=False)
    assert not finished.stopped and finished.steps == 5 and len(finished.losses) == 5
    assert finished.output == tmp_path / "out" / "loha.safetensors"
    assert read_file(finished.output)[1]["ss_steps"] == "5"


@pytest.mark.parametrize("saves", ["every step", "none"])
def test_divergence_raises_and_leaves_no_nan_file(tmp_path, saves):
    """lr 1e6: the factors blow up in one step. With a save every step the save refuses to write weights that
    overflow fp16 (inf in the file); without saves the loss turns NaN at step 2. Either way: a TrainingError
    that names the learning rate, and no non-finite file."""
    out = tmp_path / "out"
    extra = dict(save_every_n_steps=1, save_state=True, save_precision="fp16") if saves == "every step" else {}
    with pytest.raises(TrainingError) as ei:
        train(base_config(out, learning_rate=1e6, max_train_steps=8, **extra), progress=False)
    msg = str(ei.value)
    assert "learning rate" in msg and "1e+06" in msg
    if saves == "none":
        assert "loss became nan" in msg
    files = list(out.rglob("*.safetensors"))
    for f in files:
        assert_finite_file(f)
    assert not any(f.parent == out for f in files), "no adapter of the diverged run may be left in output_dir"


def test_occupied_output_dir_is_refused_before_loading_a_model(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "loha.safetensors").write_bytes(b"a previous run's adapter")

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the output folder check")

    monkeypatch.setattr(loop_mod, "load_pipeline", no_model)  # "before loading a model": no_model says so, no clock
    with pytest.raises(ConfigError) as ei:
        train(base_config(out), progress=False)
    assert "already holds outputs" in str(ei.value) and "overwrite" in str(ei.value)
    with pytest.raises(TrainingError, match="no saved state"):
        train(base_config(out), resume=True, progress=False)
    assert (out / "loha.safetensors").read_bytes() == b"a previous run's adapter"
    # overwrite=True gets past the check (to the model loading, stubbed here)
    with pytest.raises(AssertionError, match="a model was loaded"):
        train(base_config(out, overwrite=True), progress=False)


def test_validation_loss_at_every_epoch_end_including_the_last(tmp_path):
    # 16 images, 4 held out; 12 / batch 4 = 3 steps per epoch; 6 steps end exactly at the end of epoch 2,
    # which is where the old for-else skipped the epoch-end work.
    result = train(base_config(tmp_path / "out", validation_split=0.25, train_batch_size=4, max_train_steps=6,
                               preset="attn-only", train_text_encoder=False), progress=False)
    assert "4 held out for validation" in result.preflight
    assert [s for s, _ in result.val_losses] == [3, 6]
    # its value is checked against a recomputation in test_trainer.py; here: the adapter changed it between epochs
    assert result.val_losses[0][1] != result.val_losses[1][1]
    assert result.epochs == 2 and read_file(result.output)[1]["ss_epoch"] == "2"
    assert (tmp_path / "out" / "loss.png").is_file()

    # a run shorter than an epoch still reports the final adapter's validation loss; every_n_steps works
    short = train(base_config(tmp_path / "short", validation_split=0.25, max_train_steps=3, validation_every_n_steps=2,
                              preset="attn-only", train_text_encoder=False), progress=False)
    assert [s for s, _ in short.val_losses] == [2, 3]


def test_ema_file_holds_the_average_not_the_raw_weights(tmp_path):
    out = tmp_path / "out"
    result = train(base_config(out, ema_decay=0.5, max_train_steps=4, save_state=True, train_text_encoder=False),
                   progress=False)
    state = load_state(out / "state-00000004")
    raw = state["network"]  # the raw fp32 factors training continues from
    # state["ema"]["params"] follows network.parameters(); rebuild that order to name them
    net = add_loha(build_tiny_pipeline("tiny-sd1"), preset="attn-mlp", rank=4, alpha=2.0, text_encoder=False)
    names = [k for k in net.state_dict() if not k.endswith(".alpha")]
    ema = dict(zip(names, state["ema"]["params"], strict=True))
    saved, _ = read_file(result.output)
    for k in names[:: max(1, len(names) // 12)]:  # spot check a dozen tensors across the network
        assert ema[k].shape == saved[k].shape == raw[k].shape
        torch.testing.assert_close(saved[k], ema[k], rtol=0, atol=0)
    moved = [k for k in names if not torch.equal(saved[k], raw[k])]
    assert len(moved) > len(names) // 2, "the EMA file should differ from the raw weights"


def test_epochs_rotation_and_saves(tmp_path):
    out = tmp_path / "out"
    # 16 images / batch 8 = 2 steps per epoch; 5 steps = epochs 1, 2 complete + 1 step of epoch 3
    result = train(base_config(out, train_batch_size=8, max_train_steps=5, save_every_n_steps=1, save_every_n_epochs=1,
                               save_last_n=2, save_state=True, preset="attn-only", train_text_encoder=False),
                   progress=False)
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["loha-epoch0001.safetensors", "loha-epoch0002.safetensors", "loha-step000003.safetensors",
                     "loha-step000004.safetensors", "loha.safetensors", "loss.csv", "loss.png",
                     "state-00000004", "state-00000005"], names
    assert result.epochs == 3
    assert read_file(out / "loha-epoch0002.safetensors")[1]["ss_epoch"] == "2"
    assert read_file(out / "loha.safetensors")[1]["ss_epoch"] == "3"
    prog = load_state(out / "state-00000004")["progress"]
    assert (prog["epoch"], prog["batches_done"]) == (2, 0)  # saved after epoch 2's epoch-end work


def test_option_paths_train_every_module(tmp_path, monkeypatch):
    """min-SNR on v-prediction, Huber loss, noise offset, gradient checkpointing (UNet and text encoder) and
    gradient accumulation, together: every module gets a gradient, and two batches make one optimizer step.
    Each option's own effect is tested against its formula in test_options.py and test_loss.py."""
    batches = []
    real_loss_step = loop_mod.Trainer.loss_step

    def counting_loss_step(self, batch, generator=None):
        batches.append(len(batch["captions"]))
        return real_loss_step(self, batch, generator)

    monkeypatch.setattr(loop_mod.Trainer, "loss_step", counting_loss_step)
    events = []
    result = train(base_config(tmp_path / "out", pretrained_model="tiny-sd2", min_snr_gamma=5.0, loss_type="huber",
                               huber_c=0.1, noise_offset=0.1, gradient_checkpointing=True, gradient_accumulation_steps=2,
                               max_train_steps=2), progress=False, on_event=events.append)
    assert result.steps == 2 and len(result.losses) == 2 and bool(torch.isfinite(torch.tensor(result.losses)).all())
    assert batches == [2, 2, 2, 2]  # 4 batches of 2 ...
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2]  # ... for 2 optimizer steps
    tensors, meta = read_file(result.output)
    assert _untrained(tensors) == []
    assert any(k.startswith("lora_te_") for k in tensors)
    assert meta["ss_total_batch_size"] == "4" and meta["ss_min_snr_gamma"] == "5.0"


def test_logged_loss_of_a_short_accumulation_window_is_its_mean(tmp_path, monkeypatch):
    """16 images in batches of 4 with 3 accumulation steps: each epoch is a window of 3 micro-batches and a
    window of 1. The loss logged for each step (loss.csv, events, result) is the mean of its window's losses,
    so the epoch's last step does not dip to a third."""
    micro = []
    real_loss_step = loop_mod.Trainer.loss_step

    def recording_loss_step(self, batch, generator=None):
        loss = real_loss_step(self, batch, generator)
        micro.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(loop_mod.Trainer, "loss_step", recording_loss_step)
    events = []
    result = train(base_config(tmp_path / "out", train_batch_size=4, gradient_accumulation_steps=3, max_train_steps=2,
                               preset="attn-only", train_text_encoder=False), progress=False, on_event=events.append)
    assert len(micro) == 4 and result.steps == 2
    want = [sum(micro[:3]) / 3, micro[3]]
    assert result.losses == pytest.approx(want, rel=1e-6)
    assert [e.loss for e in events if isinstance(e, Progress)] == result.losses
    rows = (tmp_path / "out" / "loss.csv").read_text().splitlines()[1:]
    assert [float(r.split(",")[1]) for r in rows] == pytest.approx(want, abs=1e-6)


def test_text_embedding_cache_gives_the_same_adapter(tmp_path):
    """Frozen text encoders and static captions: cached text-encoder outputs (SDXL: both encoders' states and
    the pooled embedding) train exactly what per-step encoding trains. Batch size 1 makes the two computations
    the same: the cache encodes in batches of train_batch_size, and with several captions per batch the rows
    would be grouped differently (sorted vs shuffled), which BLAS may sum in another order (~1e-5 seen)."""
    common = dict(pretrained_model="tiny-sdxl", train_text_encoder=False, preset="attn-only", max_train_steps=2,
                  train_batch_size=1)
    cached = train(base_config(tmp_path / "cached", cache_text_encoder_outputs=True, **common), progress=False)
    plain = train(base_config(tmp_path / "plain", cache_text_encoder_outputs=False, **common), progress=False)
    a, _ = read_file(cached.output)
    b, _ = read_file(plain.output)
    assert _max_diff(a, b) == 0.0
    assert cached.losses == plain.losses
    assert not any(k.startswith("lora_te") for k in a)



def test_network_weights_start_from_a_file_and_must_fit(tmp_path):
    pipe = build_tiny_pipeline("tiny-sd1")
    net = add_loha(pipe, preset="attn-mlp", rank=4, alpha=2.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    start = net.save(tmp_path / "start.safetensors", dtype=torch.float32)
    net.remove()
    # lr 1e-12: one step leaves the weights where the file put them
    result = train(base_config(tmp_path / "out", network_weights=str(start), learning_rate=1e-12, max_train_steps=1,
                               max_grad_norm=0.0), progress=False)
    assert _max_diff(read_file(start)[0], read_file(result.output)[0]) < 1e-6

    with pytest.raises(TrainingError, match="does not fit this network"):
        train(base_config(tmp_path / "other", network_weights=str(start), network_dim=2), progress=False)


def test_network_weights_with_nan_values_are_refused(tmp_path):
    from safetensors.torch import save_file

    net = add_loha(build_tiny_pipeline("tiny-sd1"), preset="attn-mlp", rank=4, alpha=2.0)
    sd = {k: v.clone() for k, v in net.state_dict(torch.float32).items()}
    key = next(k for k in sd if k.endswith("hada_w1_a"))
    sd[key][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))  # written around our own writer, which refuses NaN
    with pytest.raises(TrainingError, match=f"{key} has NaN/Inf values"):
        train(base_config(tmp_path / "out", network_weights=str(tmp_path / "nan.safetensors")), progress=False)
