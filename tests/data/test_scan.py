from __future__ import annotations

import json
import os

from sd_loha.data.scan import parse_repeat_folder, scan_dataset

from .conftest import save_rgb, write_caption


def by_name(result):
    return {it.path.name: it for it in result.items}


def test_flat_folder_with_captions_and_extensions(make_dataset):
    root = make_dataset({
        "a.png": (32, 32), "a.txt": "red circle",
        "b.JPG": (40, 30), "b.txt": "blue",
        "c.WebP": (30, 40), "c.caption": "from caption ext",
        "d.bmp": (16, 16),
        "e.tiff": (16, 16), "e.txt": "tiff",
        "f.gif": (16, 16),
        "notes.md": "ignored",
        "model.safetensors": "x",
        "weird.xyz": "x",
    })
    r = scan_dataset(root)
    items = by_name(r)
    assert sorted(items) == ["a.png", "b.JPG", "c.WebP", "d.bmp", "e.tiff", "f.gif"]
    assert items["a.png"].caption == "red circle" and items["a.png"].caption_source == "file"
    assert items["c.WebP"].caption == "from caption ext"  # fallback to the other extension
    assert items["d.bmp"].caption is None and items["d.bmp"].caption_source is None
    assert (items["b.JPG"].width, items["b.JPG"].height) == (40, 30)
    assert all(it.repeats == 1 and it.subset_dir == root for it in r.items)
    assert r.other_files[".xyz"] == 1 and ".md" not in r.other_files
    assert items["a.png"].file_size > 0 and items["a.png"].mtime_ns > 0
    assert len(items["a.png"].key) == 16


def test_caption_extension_preference(make_dataset):
    root = make_dataset({"a.png": (8, 8), "a.txt": "txt caption", "a.caption": "caption caption", "b.png": (8, 8), "b.txt": "only txt"})
    assert by_name(scan_dataset(root))["a.png"].caption == "txt caption"
    r = scan_dataset(root, caption_extension="caption")  # without the dot works too
    assert by_name(r)["a.png"].caption == "caption caption"
    assert by_name(r)["b.png"].caption == "only txt"


def test_caption_file_edge_cases(make_dataset):
    root = make_dataset({
        "bom.png": (8, 8), "bom.txt": b"\xef\xbb\xbfsks, red",
        "crlf.png": (8, 8), "crlf.txt": b"line one, tag\r\n",
        "latin.png": (8, 8), "latin.txt": b"caf\xe9 poster",
        "empty.png": (8, 8), "empty.txt": b"",
        "blank.png": (8, 8), "blank.txt": b"  \r\n\n ",
        "multi.png": (8, 8), "multi.txt": "first line\nsecond line\n",
        "utf16.png": (8, 8), "utf16.txt": "ünïcode".encode("utf-16"),
        "missing.png": (8, 8),
    })
    r = scan_dataset(root)
    it = by_name(r)
    assert it["bom.png"].caption == "sks, red"
    assert it["crlf.png"].caption == "line one, tag"
    assert it["latin.png"].caption == "caf\ufffd poster"
    assert any("latin.txt" in w and "UTF-8" in w for w in r.warnings)
    assert it["empty.png"].caption is None and it["empty.png"].caption_path is not None
    assert it["blank.png"].caption is None
    assert it["multi.png"].caption == "first line"
    assert any("more than one line" in w and "multi.txt" in w for w in r.warnings)
    assert it["utf16.png"].caption == "ünïcode"
    assert it["missing.png"].caption is None and it["missing.png"].caption_path is None


def test_repeat_folders(make_dataset):
    root = make_dataset({
        "10_sks dog/a.png": (8, 8),
        "10_sks dog/b.png": (8, 8), "10_sks dog/b.txt": "sks dog, running",
        "10_sks dog/nested/c.png": (8, 8),
        "3_/d.png": (8, 8),
        "plain/e.png": (8, 8),
        "0_off/f.png": (8, 8),
        "top.png": (8, 8),
    })
    r = scan_dataset(root)
    it = by_name(r)
    assert (it["a.png"].repeats, it["a.png"].caption, it["a.png"].caption_source) == (10, "sks dog", "folder")
    assert (it["b.png"].caption, it["b.png"].caption_source) == ("sks dog, running", "file")
    assert it["c.png"].repeats == 10 and it["c.png"].caption == "sks dog"
    assert it["c.png"].subset_dir == root / "10_sks dog"
    assert it["d.png"].repeats == 3 and it["d.png"].caption is None
    assert it["e.png"].repeats == 1 and it["top.png"].repeats == 1
    assert "f.png" not in it
    assert any(s.path.name == "f.png" and s.kind == "zero_repeats" for s in r.skipped)
    assert parse_repeat_folder("10_sks dog") == (10, "sks dog")
    assert parse_repeat_folder("photos") is None


def test_suspicious_repeat_count_and_root_named_like_subset(tmp_path, make_dataset):
    root = make_dataset({"2024_holiday/a.png": (8, 8)})
    r = scan_dataset(root)
    assert r.items[0].repeats == 2024
    assert any("2024" in w and "repeats" in w for w in r.warnings)
    sub = make_dataset({"a.png": (8, 8)}, root=tmp_path / "5_sks cat")
    r = scan_dataset(sub)
    assert r.items[0].repeats == 1
    assert any("looks like a kohya repeat folder" in w for w in r.warnings)


def test_metadata_jsonl(make_dataset):
    root = make_dataset({
        "a.png": (8, 8), "b.png": (8, 8), "c.png": (8, 8), "sub/d.png": (8, 8),
        "c.txt": "sidecar wins",
    })
    rows = [
        {"file_name": "a.png", "text": "from text field"},
        {"file_name": "b.png", "caption": "from caption field"},
        {"file_name": "c.png", "text": "metadata loses"},
        {"file_name": "sub/d.png", "text": "in a subfolder"},
        {"file_name": "ghost.png", "text": "no such file"},
    ]
    lines = [json.dumps(r) for r in rows] + ["not json", '{"text": "no file_name"}', ""]
    (root / "metadata.jsonl").write_text("\ufeff" + "\r\n".join(lines), encoding="utf-8")
    r = scan_dataset(root)
    it = by_name(r)
    assert (it["a.png"].caption, it["a.png"].caption_source) == ("from text field", "metadata")
    assert it["b.png"].caption == "from caption field"
    assert it["c.png"].caption == "sidecar wins"
    assert it["d.png"].caption == "in a subfolder"
    assert any("metadata.jsonl" in w and "2 line(s)" in w for w in r.warnings)
    assert any("ghost.png" in w for w in r.warnings)


def test_hidden_files_and_dirs_are_skipped(make_dataset):
    root = make_dataset({
        "a.png": (8, 8), ".hidden.png": (8, 8), ".thumbs/b.png": (8, 8),
        "__MACOSX/._a.png": (8, 8), "ok/c.png": (8, 8),
    })
    r = scan_dataset(root)
    assert sorted(it.path.name for it in r.items) == ["a.png", "c.png"]
    assert r.hidden_ignored == 3


def test_symlinks_followed_but_loops_not(tmp_path, make_dataset):
    other = tmp_path / "elsewhere"
    save_rgb(other / "x.png", (8, 8))
    root = make_dataset({"a.png": (8, 8), "sub/b.png": (8, 8)})
    os.symlink(other, root / "linked")  # a symlinked folder is followed
    os.symlink(root, root / "sub" / "back_to_root")  # a loop
    os.symlink(root / "nope.png", root / "broken.png")
    os.symlink(root / "self.png", root / "self.png")
    r = scan_dataset(root)
    assert sorted(it.path.name for it in r.items) == ["a.png", "b.png", "x.png"]
    kinds = {s.path.name: s.kind for s in r.skipped}
    assert kinds == {"broken.png": "broken_link", "self.png": "link_loop"}
    assert any("symlink loop" in w for w in r.warnings)


def test_bad_images_are_skipped_with_reasons(make_dataset, tmp_path):
    root = make_dataset({"good.png": (8, 8), "photo.heic": "x", "notes.png": "plain text"})
    (root / "empty.jpg").write_bytes(b"")
    r = scan_dataset(root)
    assert [it.path.name for it in r.items] == ["good.png"]
    reasons = {s.path.name: (s.kind, s.reason) for s in r.skipped}
    assert reasons["photo.heic"][0] == "unsupported" and "HEIC" in reasons["photo.heic"][1]
    assert reasons["notes.png"][0] == "not_an_image"
    assert reasons["empty.jpg"][0] == "empty"
    path, reason = r.skipped[0]  # unpacks as (path, reason)
    assert path.exists() and reason


def test_animated_reported(make_dataset):
    from PIL import Image

    root = make_dataset({"a.png": (8, 8)})
    frames = [Image.new("RGB", (8, 8), c) for c in ["red", "blue"]]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    r = scan_dataset(root)
    assert any("animated" in w and "anim.gif" in w for w in r.warnings)


def test_many_files_use_threads_and_stay_sorted(make_dataset):
    spec = {f"img_{i:02d}.png": (8 + i, 8) for i in range(20)}
    r = scan_dataset(make_dataset(spec), verify=True)
    assert [it.path.name for it in r.items] == sorted(spec)
    assert [it.width for it in r.items] == [8 + i for i in range(20)]


def test_caption_case_insensitive_match(make_dataset):
    root = make_dataset({"IMG_1.PNG": (8, 8), "IMG_1.TXT": "upper case caption"})
    assert scan_dataset(root).items[0].caption == "upper case caption"
    write_caption(root / "IMG_1.txt", "exact name wins")
    assert scan_dataset(root).items[0].caption == "exact name wins"
