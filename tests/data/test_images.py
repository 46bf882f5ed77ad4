from __future__ import annotations

import builtins
import os

import numpy as np
import pytest
from PIL import Image

from sd_loha.data import images as images_mod
from sd_loha.data.images import MAX_IMAGE_PIXELS, ImageError, inspect_image, load_image, load_image_with_info, probe_image

from .conftest import png_header_only, save_noise, save_rgb


def expect_error(path, kind, *words, fn=load_image):
    with pytest.raises(ImageError) as ei:
        fn(path)
    err = ei.value
    assert err.kind == kind, (err.kind, err.reason)
    for w in words:
        assert w.lower() in err.reason.lower(), err.reason
    assert err.path == path
    assert str(path) in str(err)
    return err


# ----------------------------------------------------------------- broken files


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    expect_error(p, "empty", "empty", fn=probe_image)
    expect_error(p, "empty", "0 bytes")


def test_truncated_png(tmp_path):
    p = save_noise(tmp_path / "t.png", (96, 96))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert probe_image(p) == (96, 96)  # header is intact: the cheap probe cannot know
    err = expect_error(p, "truncated", "truncated")
    with pytest.raises(ImageError):
        inspect_image(p, verify=True)  # the full verify does
    assert err.reason


def test_truncated_jpeg(tmp_path):
    p = save_noise(tmp_path / "t.jpg", (128, 128), quality=95)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    expect_error(p, "truncated", "truncated")
    with pytest.raises(ImageError, match="truncated"):
        inspect_image(p, verify=True)


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\nreally\n")
    expect_error(p, "not_an_image", "text file", fn=probe_image)


def test_html_named_jpg(tmp_path):
    p = tmp_path / "download.jpg"
    p.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    expect_error(p, "not_an_image", "HTML")


def test_format_pillow_cannot_read(tmp_path):
    heic = tmp_path / "photo.png"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 200)
    expect_error(heic, "unsupported", "HEIC")
    blob = tmp_path / "blob.webp"
    # not bytes(range(256)): Pillow 10 reads a ramp from 0 as a (truncated) TGA header
    blob.write_bytes(bytes([0x13, 0x37, 0xFE, 0x99]) * 256)
    expect_error(blob, "not_an_image", "not an image format")


def test_damaged_header(tmp_path):
    p = tmp_path / "bad.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + b"\xff" * 30)
    with pytest.raises(ImageError) as ei:
        load_image(p)
    assert ei.value.kind in ("decode_error", "not_an_image")


# ----------------------------------------------------------------- colour modes


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(p, "JPEG", quality=95)  # pure red in CMYK
    assert Image.open(p).mode == "CMYK"
    im = load_image(p)
    assert im.mode == "RGB"
    r, g, b = im.getpixel((16, 16))
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "deep.png"
    arr = np.zeros((8, 8), dtype=np.uint16)
    arr[:, :4] = 65535
    arr[:, 4:] = 1000  # ~4/255: clipping would make it white
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode.startswith("I")
    im = load_image(p)
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == (255, 255, 255)
    assert im.getpixel((6, 0))[0] <= 5


def test_palette_png_with_transparency_composited_on_white(tmp_path):
    p = tmp_path / "pal.png"
    im = Image.new("P", (10, 10), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (5, 0, 10, 10))
    im.save(p, transparency=0)
    out = load_image(p)
    assert out.getpixel((1, 1)) == (255, 255, 255)  # transparent (black underneath) -> white
    assert out.getpixel((8, 1)) == (255, 0, 0)


def test_rgba_and_la_composited_on_white(tmp_path):
    p = tmp_path / "rgba.png"
    im = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    im.paste((0, 0, 255, 255), (0, 0, 5, 10))
    im.save(p)
    out = load_image(p)
    assert out.getpixel((8, 5)) == (255, 255, 255)
    assert out.getpixel((1, 5)) == (0, 0, 255)
    q = tmp_path / "la.png"
    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((0, 0), (0, 255))
    la.save(q)
    out = load_image(q)
    assert out.getpixel((3, 3)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 0)


def test_grayscale_and_bilevel(tmp_path):
    p = tmp_path / "g.png"
    Image.new("L", (6, 6), 77).save(p)
    out = load_image(p)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (77, 77, 77)
    q = tmp_path / "b.bmp"
    Image.new("1", (6, 6), 1).save(q)
    assert load_image(q).getpixel((2, 2)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_6_is_applied(tmp_path, fmt):
    p = tmp_path / f"rot.{fmt.lower()}"
    im = Image.new("RGB", (40, 20), (220, 0, 0))
    im.paste((0, 0, 220), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    kw = {"quality": 95} if fmt != "PNG" else {}
    im.save(p, fmt, exif=exif, **kw)
    assert probe_image(p) == (20, 40)  # upright size from the header
    out = load_image(p)
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 150 and top[2] < 80, top  # the stored left (red) is now on top
    assert bottom[2] > 150 and bottom[0] < 80, bottom


def test_garbled_exif_does_not_break_loading(tmp_path):
    p = tmp_path / "g.jpg"
    Image.new("RGB", (8, 8)).save(p, exif=b"Exif\x00\x00garbage-garbage")
    assert load_image(p).size == (8, 8)


# ----------------------------------------------------------------- size limits


def test_decompression_bomb_header_refused(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    far = png_header_only(tmp_path / "far.png", 100_000, 100_000)  # Pillow itself would raise
    expect_error(far, "too_large", "decompression bomb", fn=probe_image)
    expect_error(far, "too_large", "decompression bomb")
    near = png_header_only(tmp_path / "near.png", 20_000, 20_000)  # over our limit, Pillow only warns
    assert 20_000 * 20_000 > MAX_IMAGE_PIXELS
    expect_error(near, "too_large", "20000", fn=probe_image)
    assert Image.MAX_IMAGE_PIXELS == before  # Pillow's global is restored


def test_large_image_between_pillow_and_our_limit_is_accepted(tmp_path):
    # 12000×10000 = 120 MP: Pillow's default limit would warn/refuse, ours accepts.
    p = png_header_only(tmp_path / "big.png", 12_000, 10_000)
    assert probe_image(p) == (12_000, 10_000)


def test_very_large_real_image_downscaled_on_load(tmp_path):
    p = tmp_path / "huge.jpg"
    Image.new("RGB", (3200, 2400), (10, 120, 200)).save(p, quality=90)
    loaded = load_image_with_info(p, needed_size=(256, 256))
    w, h = loaded.image.size
    assert loaded.original_size == (3200, 2400)
    assert w < 3200 and h < 2400
    assert w >= 256 and h >= 256  # never below what the bucket needs
    q = tmp_path / "huge.png"
    Image.new("RGB", (2048, 1024), (0, 0, 0)).save(q)
    loaded = load_image_with_info(q, needed_size=(256, 256))
    assert loaded.image.size == (512, 256)  # integer reduction by 4
    assert load_image(q).size == (2048, 1024)  # no hint: full size


def test_exif_rotated_large_jpeg_downscale_keeps_cover(tmp_path):
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (2400, 1200), (90, 90, 90)).save(p, exif=exif)
    loaded = load_image_with_info(p, needed_size=(300, 600))
    assert loaded.original_size == (1200, 2400)
    assert loaded.image.width >= 300 and loaded.image.height >= 600
    assert loaded.image.width < 1200


# ----------------------------------------------------------------- animation


def test_animated_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    info = inspect_image(p)
    assert info.animated and any("first frame" in n for n in info.notes)
    loaded = load_image_with_info(p)
    r, g, b = loaded.image.getpixel((8, 8))
    assert r > 200 and b < 50
    assert any("first frame" in n for n in loaded.notes)


def test_animated_webp_first_frame(tmp_path):
    p = tmp_path / "anim.webp"
    frames = [Image.new("RGB", (16, 16), c) for c in [(0, 0, 255), (255, 0, 0)]]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    assert inspect_image(p).animated
    r, g, b = load_image(p).getpixel((8, 8))
    assert b > 200 and r < 50


# ----------------------------------------------------------------- filesystem


def test_unreadable_file_permission(tmp_path, monkeypatch):
    p = save_rgb(tmp_path / "secret.png")
    os.chmod(p, 0)
    try:
        if not os.access(p, os.R_OK):  # a normal user: real permission error
            expect_error(p, "permission", "permission")
        else:  # running as root reads anything: simulate the OS refusing
            real_open = builtins.open

            def deny(file, *a, **k):
                if os.fspath(file) == os.fspath(p):
                    raise PermissionError(13, "Permission denied", os.fspath(file))
                return real_open(file, *a, **k)

            monkeypatch.setattr(images_mod, "open", deny, raising=False)
            expect_error(p, "permission", "permission")
            expect_error(p, "permission", "permission", fn=probe_image)
    finally:
        os.chmod(p, 0o644)


def test_broken_symlink(tmp_path):
    p = tmp_path / "gone.png"
    os.symlink(tmp_path / "does_not_exist.png", p)
    err = expect_error(p, "broken_link", "broken symbolic link", fn=probe_image)
    assert "does_not_exist.png" in err.reason


def test_symlink_loop(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    os.symlink(b, a)
    os.symlink(a, b)
    expect_error(a, "link_loop", "loop")
    self_loop = tmp_path / "self.jpg"
    os.symlink(self_loop, self_loop)
    expect_error(self_loop, "link_loop", "loop", fn=probe_image)


def test_valid_symlink_is_followed(tmp_path):
    real = save_rgb(tmp_path / "real.png", (20, 10))
    link = tmp_path / "link.png"
    os.symlink(real, link)
    assert probe_image(link) == (20, 10)


def test_missing_folder_and_fifo(tmp_path):
    expect_error(tmp_path / "nope.png", "not_found", "not found")
    d = tmp_path / "dir.png"
    d.mkdir()
    expect_error(d, "not_a_file", "folder")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    expect_error(fifo, "not_a_file", "not a regular file")  # must not block


def test_good_image_verify_and_pickle(tmp_path):
    import pickle

    p = save_rgb(tmp_path / "ok.png", (30, 20))
    info = inspect_image(p, verify=True)
    assert (info.width, info.height, info.format) == (30, 20, "PNG")
    err = ImageError(p, "x", "empty")
    err2 = pickle.loads(pickle.dumps(err))
    assert (err2.path, err2.reason, err2.kind) == (p, "x", "empty")


def test_str_paths_work(tmp_path):
    p = save_rgb(tmp_path / "s.png", (5, 5))
    assert load_image(str(p)).size == (5, 5)
