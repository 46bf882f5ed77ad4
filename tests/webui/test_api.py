"""The web UI's flows through its HTTP API (gradio_client), against a real server launched in-process.

These call the same event handlers as the buttons in the browser (the endpoints are the buttons' events,
with the Train tab's fields as positional inputs), so they check the UI logic without a browser.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from .conftest import FAST_TOML, FAST_TRAIN, form_args, wait_for

gradio_client = pytest.importorskip("gradio_client")

STATE: dict = {}  # what the training test leaves for the generate/inspect tests


@pytest.fixture(scope="module")
def client(ui):
    _, url, _ = ui
    return gradio_client.Client(url, verbose=False, download_files=False)


def status(client) -> dict:
    return client.predict(api_name="/training_status")


def start(client, policy, resume=False, **overrides):
    api = "/resume_training" if resume else "/start_training"
    message, *_settings = client.predict(*form_args(policy, **overrides), api_name=api)
    return message


@pytest.fixture
def trained_adapter(client, ui) -> str:
    """The adapter the training test left; where that test did not run first (a test picked alone), one trained
    the same way through the API. Never a skip: a rename of what the training test leaves fails here."""
    if "adapter" not in STATE:
        _, _, policy = ui
        msg = start(client, policy, output_dir="api_run_for_one_test")
        assert msg.startswith("Started"), msg
        snap = wait_for(lambda: (s := status(client))["status"] in ("stopped", "failed", "finished") and s, 300,
                        what="the adapter's training run to end")
        assert snap["status"] == "finished", snap.get("error")
        STATE["adapter"] = snap["output"]
    return STATE["adapter"]


def test_preflight_reports_the_dataset(client, ui):
    _, _, policy = ui
    md, thumbs = client.predict(*form_args(policy), api_name="/preflight")
    assert "16 images found, 16 used, 0 skipped" in md
    assert "64×64" in md
    assert len(thumbs) == 8 and all(t["caption"] for t in thumbs)


def test_training_start_second_start_stop_resume(client, ui):
    demo, _, policy = ui
    out_dir = policy.outputs_dir / "api_run"
    msg = start(client, policy, output_dir="api_run")
    assert msg.startswith("Started"), msg
    # One job at a time: a second Start (any client) is refused while the first is active.
    second = start(client, policy, output_dir="other_run")
    assert "already active" in second
    assert not (policy.outputs_dir / "other_run").exists()
    # Stop: the run ends after its current step with an adapter and a resumable state.
    stop_msg = client.predict(api_name="/stop_training")
    assert "Stop requested" in stop_msg
    snap = wait_for(lambda: (s := status(client))["status"] in ("stopped", "failed", "finished") and s, 300,
                    what="the stopped run to end")
    assert snap["status"] == "stopped", snap.get("error")
    assert snap["step"] >= 1 and snap["step"] < 6
    assert list(out_dir.glob("state-*")), "a resumable state was saved"
    stopped_at = snap["step"]

    # Resume continues that run to the end.
    msg = start(client, policy, resume=True, output_dir="api_run")
    assert msg.startswith("Resumed"), msg
    seen_steps = set()

    def finished():
        s = status(client)
        if s["total"]:
            seen_steps.add(s["step"])
        return s if s["status"] in ("finished", "failed", "stopped") else None

    snap = wait_for(finished, 300, what="the resumed run to finish")
    assert snap["status"] == "finished", snap.get("error")
    assert snap["step"] == snap["total"] == 6
    assert min(seen_steps) > stopped_at  # it did not start over
    assert [s for s, _ in snap["losses"]] == list(range(1, 7))  # the history before the stop is kept
    out = Path(snap["output"])
    assert out == out_dir / "tiny.safetensors" and out.is_file()
    STATE["adapter"] = str(out)
    assert demo.sdl_runner.snapshot()["active"] is False

    # A finished run's folder is not silently overwritten by a new Start.
    msg = start(client, policy, output_dir="api_run")
    assert "Cannot start" in msg and "Overwrite" in msg


def test_failed_start_is_explained(client, ui):
    _, _, policy = ui
    msg = start(client, policy, output_dir="bad_run", resolution="64", network_dim=0)
    assert "Cannot start" in msg and "network_dim" in msg
    assert status(client)["status"] != "training"


def _generate(client, adapter, strength, seed=7, lbw=None, base="auto", prompt="sdlohastyle, poster, red circle"):
    # common inputs: model, prompt, negative, steps, guidance, width, height, scheduler; then seed, count; 3 slots
    # of (file, strength, TE strength, block weights); the base's storage
    slots = [adapter, strength, "", lbw, None, 1.0, "", None, None, 1.0, "", None]
    return client.predict("tiny-sd1", prompt, "", 3, 5.0, 64, 64, "euler", seed, 1, *slots, base, api_name="/generate")


def test_generate_strength_zero_vs_one(client, ui, trained_adapter):
    _, _, policy = ui
    adapter = trained_adapter
    msg0, _, params0, files0 = _generate(client, adapter, 0.0)
    msg1, _, params1, files1 = _generate(client, adapter, 1.0)
    assert "Saved 1 image" in msg0 and "Saved 1 image" in msg1, (msg0, msg1)
    p0, p1 = Path(files0[0]), Path(files1[0])
    assert p0.is_file() and p1.is_file() and p0 != p1
    assert p0.resolve().is_relative_to(policy.outputs_dir)
    a = np.asarray(Image.open(p0).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(p1).convert("RGB"), dtype=np.int16)
    assert a.shape == b.shape == (64, 64, 3)
    assert np.abs(a - b).max() > 0, "strength 0 and strength 1 gave the same image"
    # A1111 'parameters' chunk, with the adapter and its strength
    info0, info1 = Image.open(p0).info["parameters"], Image.open(p1).info["parameters"]
    assert "<lora:tiny:0>" in info0 and "<lora:tiny:1>" in info1 and "Seed: 7" in info0 and "Seed: 7" in info1
    assert info0 == params0
    # the same seed and strength again: the re-strengthened merge is exact, the image identical
    _, _, _, files0b = _generate(client, adapter, 0.0)
    assert np.array_equal(np.asarray(Image.open(files0b[0]).convert("RGB"), dtype=np.int16), a)


def test_generate_on_an_int8_base(client, ui, trained_adapter):
    """The Generate tab's "Base weights" loads the base quantized (bitsandbytes int8 on the CPU): its Linear layers are
    stored as int8, the adapter takes the bypass and never writes them, strength 0 is that base's own picture."""
    pytest.importorskip("bitsandbytes")
    from sd_loha.train.lowmem import stored_as

    demo = ui[0]
    _, _, _, plain = _generate(client, None, 1.0, base="int8")
    pipe = demo.sdl_generator.session.pipe
    assert demo.sdl_generator.session.base_weight_dtype == "int8"
    kinds = [stored_as(m) for m in pipe.unet.modules() if type(m).__name__ == "Linear8bitLt"]
    assert len(kinds) > 10 and set(kinds) == {"int8"}
    before = {n: t.clone() for n, t in pipe.unet.state_dict().items() if t.dtype == torch.int8}
    _, _, _, zero = _generate(client, trained_adapter, 0.0, base="int8")
    _, _, _, one = _generate(client, trained_adapter, 1.0, base="int8")
    a, z, b = (np.asarray(Image.open(f[0]).convert("RGB"), dtype=np.int16) for f in (plain, zero, one))
    assert np.array_equal(a, z) and np.abs(a - b).max() > 0
    after = pipe.unet.state_dict()
    assert before and all(torch.equal(after[n], t) for n, t in before.items())


def test_grid(client, ui, trained_adapter):
    adapter = trained_adapter
    msg, gallery, params, files = client.predict("tiny-sd1", "sdlohastyle, poster", "", 2, 5.0, 64, 64, "euler",
                                                 [adapter], "0, 1", "3", adapter, "auto", api_name="/grid")
    assert "Grid saved" in msg, msg
    grid = Image.open(files[0])
    assert len(files) == 3  # the grid, then its two cells
    assert grid.width > 2 * 64 and grid.height > 64  # two columns plus the row-label margin, a header row
    assert "Grid: rows = tiny.safetensors; strengths = 0, 1; seeds = 3" in grid.info["parameters"]
    # each line of the prompt box is a row of its own (blank lines none)
    msg, _, params, files = client.predict("tiny-sd1", "sdlohastyle, poster\n\nred circle", "", 2, 5.0, 64, 64,
                                           "euler", [adapter], "0, 1", "3", adapter, "auto", api_name="/grid")
    assert len(files) == 5 and "prompts = sdlohastyle, poster | red circle; strengths = 0, 1" in params, msg
    assert Image.open(files[0]).height - grid.height == 128  # one more row of 64 px cells, drawn at 2x


def test_style_vs_strength_grid(client, ui, trained_adapter):
    """The "Style vs strength" button: slot 1's adapter at each of STRENGTH_SWEEP (columns) for each line of the
    prompt box (rows) at the Seed box's seed. Strength 0 is the base model's picture; strength 1 the Generate
    button's (which merges: the grid's bypass rounds differently, by at most 1 of 255)."""
    from sd_loha.grid import MIN_GRID_CELL, STRENGTH_SWEEP

    adapter = trained_adapter
    prompts = ["sdlohastyle, poster, red circle", "sdlohastyle, poster, blue square"]
    # common inputs, then the Seed box, LoHA file 1, the grid's files, the base's storage
    msg, _, params, files = client.predict("tiny-sd1", "\n".join(prompts), "", 3, 5.0, 64, 64, "euler", 7, adapter,
                                           [], "auto", api_name="/style_grid")
    assert "Grid saved" in msg, msg
    n, rows = len(STRENGTH_SWEEP), len(prompts)
    assert len(files) == 1 + rows * n  # the grid, then its cells row by row
    grid = np.asarray(Image.open(files[0]).convert("RGB"), dtype=np.int16)
    cells = [np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in files[1:]]
    zoom = MIN_GRID_CELL // 64
    side = 64 * zoom
    top, left = grid.shape[0] - rows * side, grid.shape[1] - n * side
    assert 0 < top < side and 0 < left <= 260
    for i, cell in enumerate(cells):
        r, c = divmod(i, n)
        assert cell.shape == (64, 64, 3)
        assert np.array_equal(grid[top + r * side:top + (r + 1) * side:zoom, left + c * side:left + (c + 1) * side:zoom],
                              cell)
    # labels: text above every column (each a different strength), left of every row (each a different prompt)
    heads = [grid[:top, left + c * side:left + (c + 1) * side] for c in range(n)]
    margins = [grid[top + r * side:top + (r + 1) * side, :left] for r in range(rows)]
    assert all((h < 128).any() for h in heads + margins)
    assert all(not np.array_equal(a, b) for a, b in zip(heads, heads[1:])) and not np.array_equal(*margins)
    assert ("prompts = " + " | ".join(prompts) + "; strengths = " + ", ".join(f"{s:g}" for s in STRENGTH_SWEEP)
            + "; seeds = 7") in params
    assert [f"<lora:tiny:{s:g}>" in Image.open(f).info["parameters"] for f, s in zip(files[1:], STRENGTH_SWEEP)] \
        == [True] * n
    for r, prompt in enumerate(prompts):
        base = np.asarray(Image.open(_generate(client, None, 1.0, prompt=prompt)[3][0]).convert("RGB"), dtype=np.int16)
        one = np.asarray(Image.open(_generate(client, adapter, 1.0, prompt=prompt)[3][0]).convert("RGB"),
                         dtype=np.int16)
        assert np.array_equal(cells[r * n], base)  # strength 0: the base model's picture, pixel for pixel
        assert np.abs(cells[r * n + n - 1] - base).max() > 0
        assert np.abs(cells[r * n + n - 1] - one).max() <= 1
    # no adapter in slot 1 nor in the grid's files: said in words, nothing drawn
    msg, *_ = client.predict("tiny-sd1", "x", "", 3, 5.0, 64, 64, "euler", 7, None, [], "auto", api_name="/style_grid")
    assert "LoHA file 1" in msg


def test_inspect(client, ui, trained_adapter):
    adapter = trained_adapter
    md, chart, meta = client.predict(adapter, api_name="/inspect")
    assert "SD 1" in md or "stable-diffusion-v1" in md
    assert "loha" in md.lower() and "rank 4, alpha 4" in md
    assert meta["ss_output_name"] == "tiny"
    rows = chart["value"]["data"] if isinstance(chart, dict) and "value" in chart else chart["data"]
    assert rows and all(r[1] > 0 for r in rows)


def test_tools_merge_meta_and_block_weights(client, ui, trained_adapter):
    """The Tools tab's merge and the Inspect tab's editors through their endpoints: a real merge of tiny-sd1 with
    its report, a refused output path in words, metadata saved (hash unchanged), block weights in Generate."""
    from sd_loha.io import addnet_hash
    from sd_loha.meta import read_metadata

    _, _, policy = ui
    adapter = trained_adapter
    slots = [adapter, 0.5, "", "OUTD", None, 1.0, "", None, None, 1.0, "", None]
    md = client.predict("tiny-sd1", "fp16", "api/merged.safetensors", *slots, api_name="/merge")
    out = policy.outputs_dir / "api" / "merged.safetensors"
    assert out.is_file() and f"`{out}`" in md and "| `tiny.safetensors` | 0.5 | 0.5 | OUTD |" in md, md
    md = client.predict("tiny-sd1", "fp16", "../../merged.safetensors", *slots, api_name="/merge")
    assert "Cannot merge" in md and "outside the folders" in md
    md = client.predict("tiny-sd1", "fp16", "m.safetensors", adapter, 1.0, "", "NOPE", *slots[4:], api_name="/merge")
    assert "Cannot merge" in md and "block weights 'NOPE'" in md and "INS" in md  # the library's message
    msg, table = client.predict("INS", api_name="/block_weights")
    assert msg == "" and len(table["data"]) == 26
    before = addnet_hash(adapter)
    msg, _thumb, meta = client.predict(adapter, "API title", "sdlohastyle", "made over the API", None, False,
                                       api_name="/save_meta")
    assert "Saved" in msg and "unchanged" in msg and addnet_hash(adapter) == before
    assert read_metadata(adapter)["modelspec.title"] == "API title" == meta["modelspec.title"]
    _, title, trigger, *_ = client.predict(adapter, api_name="/read_meta")
    assert (title, trigger) == ("API title", "sdlohastyle")
    msg, _, params, _ = _generate(client, adapter, 1.0, lbw="OUTD")
    assert "Saved 1 image" in msg and "<lora:tiny:1:lbw=OUTD>" in params


def test_paths_outside_the_folders_are_refused(client, ui, tmp_path):
    _, url, policy = ui
    # dataset: parent escapes, absolute paths elsewhere, a link pointing out
    for bad in ("../../..", "/etc", str(tmp_path)):
        md, _ = client.predict(*form_args(policy, train_data_dir=bad), api_name="/preflight")
        assert "refused" in md and "outside the folders" in md, (bad, md)
    link = policy.data_dir / "sneaky"
    link.symlink_to(tmp_path, target_is_directory=True)
    try:
        md, _ = client.predict(*form_args(policy, train_data_dir="sneaky"), api_name="/preflight")
        assert "refused" in md and "symbolic link" in md
    finally:
        link.unlink()
    # an image link inside a dataset folder that points out
    ds = policy.data_dir / "linked"
    shutil.copytree(policy.data_dir / "demo", ds)
    (ds / "outside.png").symlink_to(tmp_path / "x.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    md, _ = client.predict(*form_args(policy, train_data_dir="linked"), api_name="/preflight")
    assert "lead outside the allowed folders" in md and "outside.png" in md
    # output folder, model, adapters
    msg = start(client, policy, output_dir=str(tmp_path / "out"))
    assert "Cannot start" in msg and "output_dir" in msg and "outside the folders" in msg
    msg = start(client, policy, output_dir="x", pretrained_model="../../model.ckpt")
    assert "Cannot start" in msg and "pickle" in msg
    msg, *_ = _generate(client, "/etc/passwd", 1.0)
    assert "refused" in msg and "outside the folders" in msg
    bad_ckpt = policy.outputs_dir / "evil.ckpt"
    bad_ckpt.write_bytes(b"not really")
    msg, *_ = _generate(client, str(bad_ckpt), 1.0)
    assert "does not open" in msg and ".ckpt" in msg
    md, *_ = client.predict("../../../etc/passwd", api_name="/inspect")
    assert "Refused" in md
    # config files
    msg, *_ = client.predict("/tmp/elsewhere.toml", *form_args(policy), api_name="/save_config")
    assert "Cannot save" in msg and "outside the folders" in msg
    # gradio's file route serves the allowed folders only
    inside = policy.data_dir / "demo" / "poster_01.png"
    with urllib.request.urlopen(f"{url}gradio_api/file={inside}") as r:
        assert r.status == 200
    for outside in ("/etc/passwd", str(Path(__file__).resolve()), str(tmp_path / "x.png")):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}gradio_api/file={outside}")
        assert e.value.code == 403


def test_config_saved_in_the_ui_trains_identically_from_the_cli(client, ui):
    from sd_loha.train.config import load_config
    from webui.train_tab import (
        FIELD_NAMES,
        build_config,
        default_form,
        section_names,
        start_toml,
    )

    _, _, policy = ui
    box = FAST_TOML + "noise_offset = 0.05\n"
    fields = {"output_dir": "cfg_run", "sample_prompts": "a\nb", "length_unit": "epochs", "length": 3}
    args = form_args(policy, box, **fields)
    msg, *written = client.predict("my.toml", *args, api_name="/save_config")
    assert msg.startswith("Saved"), msg
    saved = policy.outputs_dir / "my.toml"
    cli_cfg = load_config(saved)  # what `sd-loha train --config` reads
    page = {**default_form(policy), **FAST_TRAIN, **fields}
    ui_cfg = build_config(policy, page, box, start_toml())
    assert cli_cfg.to_dict() == ui_cfg.to_dict()
    assert cli_cfg.max_train_epochs == 3 and cli_cfg.max_train_steps is None and cli_cfg.noise_offset == 0.05
    assert Path(cli_cfg.train_data_dir) == policy.data_dir / "demo"  # written resolved: any working folder
    # Save wrote that config back into the fields, the box and the sections
    n = len(FIELD_NAMES)
    assert written[n] == saved.read_text(encoding="utf-8") and len(written) == n + 1 + len(section_names())
    assert dict(zip(section_names(), written[n + 1:]))["noise_offset"] == 0.05
    # and back: loading that file fills the fields and the sections with the same values
    loaded = client.predict(str(saved), api_name="/load_config")
    assert loaded[0].startswith("Loaded")
    back = {**dict(zip(FIELD_NAMES, loaded[1:n + 1])), **dict(zip(section_names(), loaded[n + 2:]))}
    assert back["length_unit"] == "epochs" and back["length"] == 3 and back["sample_prompts"] == "a\nb"
    assert back["noise_offset"] == 0.05 and back["max_bucket_reso"] == 128
    assert build_config(policy, back, loaded[n + 1], loaded[n + 1]).to_dict() == cli_cfg.to_dict()


def _random_adapter(path: Path) -> str:
    """A LoHA with random (non-zero) factors for tiny-sd1, so strength visibly changes the image."""
    import torch

    from sd_loha import add_loha
    from sd_loha.models import build_tiny_pipeline

    net = add_loha(build_tiny_pipeline("tiny-sd1"), preset="attn-mlp", rank=4, alpha=4.0, text_encoder=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    net.save(path)
    return str(path)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _generate_args(adapter: str, i: int) -> list:
    """Arguments of the /generate endpoint for request i: the adapter at strength i % 2, seed 100 + i // 2
    (so requests 2k and 2k+1 share a seed and differ in strength)."""
    slots = [adapter, float(i % 2), "", None, None, 1.0, "", None, None, 1.0, "", None]
    return ["tiny-sd1", "sdlohastyle, poster", "", 2, 5.0, 64, 64, "euler", 100 + i // 2, 1, *slots]


def test_twenty_concurrent_generation_requests(client, ui):
    """20 requests sent at once from 20 clients queue and all complete, each with its own seed and strength:
    the queue never mixes one request's adapter strength into another's image."""
    _, url, policy = ui
    adapter = _random_adapter(policy.outputs_dir / "concurrent.safetensors")
    clients = [gradio_client.Client(url, verbose=False, download_files=False) for _ in range(20)]
    jobs = []
    for i, c in enumerate(clients):
        jobs.append(c.submit(*_generate_args(adapter, i), api_name="/generate"))
    results = [j.result(timeout=600) for j in jobs]
    files = []
    for i, (msg, _, params, out) in enumerate(results):
        assert "Saved 1 image" in msg, (i, msg)
        assert f"Seed: {100 + i // 2}" in params and f"<lora:concurrent:{i % 2}>" in params, (i, params)
        files.append(Path(out[0]))
    assert len(set(files)) == 20 and all(f.is_file() for f in files)
    # Pairs share a seed and differ in strength: the images differ. A request repeated alone afterwards
    # gives exactly the image it gave in the crowd.
    assert all(np.abs(_pixels(files[2 * k]) - _pixels(files[2 * k + 1])).max() > 0 for k in range(10))
    for i in (0, 7, 19):
        _, _, _, again = client.predict(*_generate_args(adapter, i), api_name="/generate")
        assert np.array_equal(_pixels(again[0]), _pixels(files[i])), i


def test_client_disconnect_does_not_stop_training(ui, tmp_path):
    """A browser tab that closes (here: a client process killed mid-run) leaves the training running."""
    demo, url, policy = ui
    wait_for(lambda: not demo.sdl_runner.snapshot()["active"], 300, what="an earlier run to end")
    args = form_args(policy, output_dir="disconnect_run", length=12)
    script = textwrap.dedent(f"""
        import json, sys, time
        from gradio_client import Client
        c = Client({url!r}, verbose=False, download_files=False)
        msg, *_ = c.predict(*json.loads(sys.argv[1]), api_name="/start_training")
        print(msg, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(args)], stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("Started"), first
    finally:
        proc.kill()
        proc.wait()
    assert demo.sdl_runner.snapshot()["active"], "the run ended before its client went away; make it longer"
    other = gradio_client.Client(url, verbose=False, download_files=False)
    snap = wait_for(lambda: (s := status(other))["status"] in ("finished", "failed", "stopped") and s, 300,
                    what="the run to finish after its client went away")
    assert snap["status"] == "finished", snap.get("error")
    assert snap["step"] == snap["total"] == 12
    assert (policy.outputs_dir / "disconnect_run" / "tiny.safetensors").is_file()


def test_generate_with_tiny_sd3_and_an_sd3_loha(client, ui):
    """The Generate tab on SD 3.x: tiny-sd3 is listed, draws with its flow Euler, the LoHA's strength changes the
    picture, and a sampler for the UNet families is refused in words."""
    from sd_loha.models import build_tiny_pipeline
    from tests.sd3_helpers import write_sd3_loha

    _, _, policy = ui
    assert "tiny-sd3" in policy.model_choices()
    adapter = str(write_sd3_loha(build_tiny_pipeline("tiny-sd3"), policy.outputs_dir / "sd3style.safetensors"))
    images = []
    for strength in (0.0, 1.0):
        slots = [adapter, strength, "", None, None, 1.0, "", None, None, 1.0, "", None]
        msg, _, params, files = client.predict("tiny-sd3", "a red dog", "", 2, 4.5, 64, 64, "euler", 5, 1, *slots,
                                               "auto", api_name="/generate")
        assert msg.startswith("Saved"), msg
        assert "Sampler: Euler," in params and "Model: tiny-sd3" in params
        images.append(_pixels(files[0]))
    assert np.abs(images[0] - images[1]).max() > 10
    msg, *_ = client.predict("tiny-sd3", "a red dog", "", 2, 4.5, 64, 64, "euler_a", 5, 1, *slots, "auto",
                             api_name="/generate")
    assert "integrates a noise prediction" in msg


def test_training_tiny_sd3_from_the_train_tab(client, ui):
    """The Train tab trains an SD 3.x model: the run finishes, its file is in kohya's fused form (joint blocks, fused
    qkv) with SD 3.x metadata, and loads strictly on tiny-sd3."""
    from safetensors import safe_open

    from sd_loha.merge import apply_loha
    from sd_loha.models import load_pipeline

    demo, _, policy = ui
    wait_for(lambda: not demo.sdl_runner.snapshot()["active"], 300, what="an earlier run to end")
    msg = start(client, policy, output_dir="sd3_run", pretrained_model="tiny-sd3", length=3)
    assert msg.startswith("Started"), msg
    snap = wait_for(lambda: (s := status(client))["status"] in ("stopped", "failed", "finished") and s, 300,
                    what="the SD 3.x run to end")
    assert snap["status"] == "finished", snap.get("error")
    with safe_open(snap["output"], "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn_qkv.") for k in keys), keys[:5]
    assert meta["ss_base_model_version"] and "stable-diffusion-3" in meta["modelspec.architecture"]
    report = apply_loha(load_pipeline("tiny-sd3"), snap["output"], strict=True)
    assert report.patched["transformer"] > 10
