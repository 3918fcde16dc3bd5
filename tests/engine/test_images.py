"""One image in every form it comes in gives one content frame (issue 13.4: a uint8 CHW tensor or a uint16 array
was divided by 1 and clamped to white, silently); any other form is a one-line error before any network runs."""

import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from engine.images import to_pixels
from engine.pipeline import CMDPipeline
from engine.run import main as run_main

TINY = "random:" + os.path.join(os.path.dirname(__file__), "tiny_config.json")
FAST = dict(num_inference_steps=1, motion_steps=1, progress=False)
pytestmark = pytest.mark.usefixtures("fast_cpu")


@pytest.fixture(scope="module")
def pipe():
    return CMDPipeline.from_pretrained(TINY)


def _png16_rgb(path, rgb: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one): IHDR bit depth 16, colour type 2."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _forms(u8: np.ndarray, tmp_path):
    """The picture ``u8`` (H, W, 3) uint8 in every accepted form -> {name: (image, tolerance)}. uint16 forms hold
    u8 * 257, the same picture at full 16-bit scale; float forms u8 / 255."""
    u16 = u8.astype(np.uint16) * 257
    f64 = u8.astype(np.float64) / 255
    forms = {}
    for name, arr, tol in (("uint8", u8, 1e-6), ("uint16", u16, 1e-6), ("float32", f64.astype(np.float32), 1e-6),
                           ("float64", f64, 1e-6), ("float16", f64.astype(np.float16), 1e-3)):
        chw = np.ascontiguousarray(arr.transpose(2, 0, 1))
        forms[f"numpy-{name}-HWC"] = (arr, tol)
        forms[f"numpy-{name}-CHW"] = (chw, tol)
        forms[f"numpy-{name}-1HWC"] = (arr[None], tol)
        forms[f"numpy-{name}-1CHW"] = (chw[None], tol)
        forms[f"torch-{name}-CHW"] = (torch.from_numpy(chw), tol)
        forms[f"torch-{name}-HWC"] = (torch.from_numpy(arr), tol)
        forms[f"torch-{name}-1CHW"] = (torch.from_numpy(chw)[None], tol)
    forms["torch-bfloat16-CHW"] = (torch.from_numpy(f64.transpose(2, 0, 1).copy()).to(torch.bfloat16), 4e-3)
    forms["list-of-one"] = ([u8], 1e-6)
    forms["PIL-RGB"] = (Image.fromarray(u8), 1e-6)
    forms["PIL-RGBA-opaque"] = (Image.fromarray(np.dstack([u8, np.full(u8.shape[:2], 255, np.uint8)])), 1e-6)
    Image.fromarray(u8).save(tmp_path / "rgb8.png")
    forms["file-png8"] = (str(tmp_path / "rgb8.png"), 1e-6)
    forms["file-png8-pathlib"] = (tmp_path / "rgb8.png", 1e-6)
    _png16_rgb(tmp_path / "rgb16.png", u16)
    forms["file-png16-rgb"] = (str(tmp_path / "rgb16.png"), 1e-6)  # Pillow reads 16-bit RGB as its top 8 bits
    return forms


def test_every_form_of_one_image_gives_the_same_content_frame(pipe, tmp_path):
    cfg = pipe.config
    u8 = np.random.default_rng(3).integers(0, 256, (cfg.height, cfg.width, 3), dtype=np.uint8)
    u8[0, 0] = (0, 128, 255)  # full scale present: a wrong scale cannot hide
    expected = torch.from_numpy(u8).permute(2, 0, 1).double() / 255 * 2 - 1
    for name, (image, tol) in _forms(u8, tmp_path).items():
        content = pipe.prepare_image(image, cfg.height, cfg.width, 1)
        assert content.shape == (1, 3, cfg.height, cfg.width), name
        err = (content[0].double() - expected).abs().max().item()
        assert err <= 2 * tol, f"{name}: content frame off by {err:.2e}"
    # through the whole pipeline, a uint8 CHW tensor (the example) and the file give the same video
    a = pipe("moving left", image=torch.from_numpy(u8).permute(2, 0, 1), generator=0, **FAST)
    b = pipe("moving left", image=str(tmp_path / "rgb8.png"), generator=0, **FAST)
    torch.testing.assert_close(a.content, b.content)
    np.testing.assert_array_equal(a.frames, b.frames)


def test_16bit_grey_image_from_a_file_pil_and_an_array_agree(pipe, tmp_path):
    cfg = pipe.config
    grey = np.random.default_rng(4).integers(0, 65536, (cfg.height, cfg.width), dtype=np.uint16)
    grey[0, 0] = 65535
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    expected = torch.from_numpy(grey.astype(np.float64) / 65535)[None].expand(3, -1, -1) * 2 - 1
    float_grey = Image.fromarray((grey / 65535).astype(np.float32))  # PIL mode "F"
    for image in (str(tmp_path / "grey16.png"), Image.open(tmp_path / "grey16.png"), float_grey,
                  np.repeat(grey[..., None], 3, axis=2), torch.from_numpy(np.repeat(grey[None], 3, axis=0))):
        content = pipe.prepare_image(image, cfg.height, cfg.width, 1)
        assert (content[0].double() - expected).abs().max().item() < 1e-6, type(image)


def test_other_sizes_are_resized_and_a_batch_gives_one_image_per_prompt(pipe):
    cfg = pipe.config
    rng = np.random.default_rng(5)
    big = rng.integers(0, 256, (2 * cfg.height, 2 * cfg.width, 3), dtype=np.uint8)
    pixels = to_pixels(big)
    want = torch.nn.functional.interpolate(pixels, size=(cfg.height, cfg.width), mode="bilinear", antialias=True,
                                           align_corners=False) * 2 - 1
    for form in (big, torch.from_numpy(big).permute(2, 0, 1), big.astype(np.uint16) * 257):
        torch.testing.assert_close(pipe.prepare_image(form, cfg.height, cfg.width, 1), want, atol=1e-5, rtol=0)
    two = rng.random((2, 3, cfg.height, cfg.width), dtype=np.float32)
    content = pipe.prepare_image(torch.from_numpy(two), cfg.height, cfg.width, 2)
    torch.testing.assert_close(content, torch.from_numpy(two) * 2 - 1)


@pytest.mark.parametrize("image, error, words", [
    (np.zeros((32, 32, 3), np.int64), TypeError, "int64"),
    (torch.zeros(3, 32, 32, dtype=torch.int32), TypeError, "int32"),
    (np.zeros((32, 32, 3), bool), TypeError, "bool"),
    (np.full((32, 32, 3), 200.0, np.float32), ValueError, "[0, 1]"),
    (np.full((32, 32, 3), -0.5, np.float32), ValueError, "-0.5"),
    (np.full((32, 32, 3), np.nan, np.float32), ValueError, "NaN"),
    (np.zeros((32, 32), np.uint8), ValueError, "(32, 32)"),
    (np.zeros((32, 32, 4), np.uint8), ValueError, "(32, 32, 4)"),
    (np.zeros((1, 1, 32, 32, 3), np.uint8), ValueError, "(1, 1, 32, 32, 3)"),
    (np.zeros((2, 32, 32, 3), np.uint8), ValueError, "2 images for 1 prompts"),
    (np.zeros((0, 32, 32, 3), np.uint8), ValueError, "empty"),
    (b"\x89PNG", TypeError, "bytes"),
    (Image.new("F", (32, 32), 2.0), ValueError, "[0, 1]"),
    (Image.new("I", (32, 32)), TypeError, "'I'"),
    ([], ValueError, "empty list"),
], ids=["int64", "torch-int32", "bool", "float-0-255", "negative", "nan", "2d", "rgba-array", "5d", "two-for-one",
        "empty", "bytes", "pil-float", "pil-int32", "empty-list"])
def test_any_other_form_is_a_one_line_error_before_any_network_runs(pipe, monkeypatch, image, error, words):
    calls = []
    for name in ("unet_step", "dit_step", "decode"):
        monkeypatch.setattr(pipe.backend, name, lambda *a, _n=name: calls.append(_n))
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a: calls.append("text"))
    with pytest.raises(error) as info:
        pipe("moving left", image=image, generator=0, **FAST)
    message = str(info.value)
    assert words in message and "\n" not in message, message
    assert not calls


def test_cli_takes_a_16bit_image_and_refuses_an_unusable_one(tmp_path, capsys):
    model = TINY
    grey = np.random.default_rng(6).integers(0, 65536, (16, 16), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    out = tmp_path / "v.npy"
    assert run_main(["--prompt", "moving left", "--model", model, "--image", str(tmp_path / "grey16.png"),
                     "--motion-steps", "1", "--quiet", "--out", str(out)]) == 0
    assert out.is_file()
    bad = np.full((16, 16), 3.0, np.float32)
    Image.fromarray(bad).save(tmp_path / "bright.tiff")
    capsys.readouterr()
    code = run_main(["--prompt", "moving left", "--model", model, "--image", str(tmp_path / "bright.tiff"),
                     "--quiet", "--out", str(tmp_path / "w.npy")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "bright.tiff" in err and "\n" not in err, err
    assert not (tmp_path / "w.npy").exists()


# -- images as a viewer shows them (issue 25.5): each kind of file built with PIL here, read as a path and as
# the PIL image a user would hold, both giving the picture a viewer shows.

def _blocks(h=32, w=24) -> np.ndarray:
    """A picture of flat 8x8 blocks of saturated and mid colours (JPEG keeps flat blocks within a few levels)."""
    colours = np.array([(255, 0, 0), (0, 200, 0), (0, 0, 255), (250, 220, 30), (30, 30, 30), (140, 90, 200)],
                       np.uint8)
    idx = (np.arange(h)[:, None] // 8 + 2 * (np.arange(w)[None] // 8)) % len(colours)
    return colours[idx]


def _viewer_checks(path, want: np.ndarray, atol: float):
    """The file as a path and as a PIL image both give ``want`` (H, W, 3) uint8 within ``atol`` levels."""
    for form in (str(path), Image.open(path)):
        got = (to_pixels(form)[0].permute(1, 2, 0).numpy() * 255).round()
        assert got.shape == want.shape, (type(form), got.shape, want.shape)
        err = np.abs(got - want.astype(np.float64)).max()
        assert err <= atol, f"{type(form).__name__} {path}: off by {err} levels"


def test_cmyk_jpeg_adobe_inverted_gives_the_picture_not_its_negative(tmp_path):
    rgb = _blocks()
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(path, quality=98)
    data = path.read_bytes()
    assert b"Adobe" in data[:200], "PIL writes CMYK JPEGs as Photoshop does: an Adobe marker, inverted samples"
    assert Image.open(path).mode == "CMYK"
    _viewer_checks(path, rgb, atol=12)


@pytest.mark.parametrize("orientation, turn", [(3, lambda a: a[::-1, ::-1]), (6, lambda a: np.rot90(a, -1)),
                                               (8, lambda a: np.rot90(a, 1)), (2, lambda a: a[:, ::-1])])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    rgb = np.random.default_rng(7).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    Image.fromarray(rgb).save(path, exif=exif)
    _viewer_checks(path, np.ascontiguousarray(turn(rgb)), atol=0)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return rgb * a + 255 * (1 - a)


def test_alpha_is_composited_over_white_in_every_mode_that_has_it(tmp_path):
    rng = np.random.default_rng(8)
    rgb = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (10, 14), dtype=np.uint8)
    alpha[0, :3] = (0, 255, 128)  # fully transparent, opaque and half
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    _viewer_checks(tmp_path / "rgba.png", _over_white(rgb, alpha), atol=1)
    grey = rgb[..., 0]
    Image.fromarray(np.dstack([grey, alpha]), mode="LA").save(tmp_path / "la.png")
    _viewer_checks(tmp_path / "la.png", _over_white(np.repeat(grey[..., None], 3, 2), alpha), atol=1)
    # a palette whose entry 0 is transparent (GIF/PNG "transparency"): those pixels show white
    pal = Image.fromarray(rgb).quantize(8)
    indices = np.array(pal)
    pal.save(tmp_path / "p.png", transparency=0)
    want = np.array(pal.convert("RGB")).astype(np.float64)
    want[indices == 0] = 255
    _viewer_checks(tmp_path / "p.png", want, atol=0)
    pal.save(tmp_path / "p.gif", transparency=0)
    _viewer_checks(tmp_path / "p.gif", want, atol=0)


def test_palette_grey_and_one_bit_images(tmp_path):
    rgb = np.random.default_rng(9).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "p.png")
    _viewer_checks(tmp_path / "p.png", np.array(pal.convert("RGB")), atol=0)
    grey = rgb[..., 1]
    Image.fromarray(grey).save(tmp_path / "l.png")
    _viewer_checks(tmp_path / "l.png", np.repeat(grey[..., None], 3, 2), atol=0)
    Image.fromarray(grey > 128).save(tmp_path / "1.png")
    _viewer_checks(tmp_path / "1.png", np.repeat(np.where(grey > 128, 255, 0)[..., None], 3, 2), atol=0)


def test_cli_image_is_the_pil_image_of_the_same_file(pipe, tmp_path):
    """--image and pipe(image=PIL image) go through one rule: same content frame for a rotated CMYK JPEG."""
    cfg = pipe.config
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_blocks(cfg.width, cfg.height)).convert("CMYK").save(tmp_path / "c.jpg", exif=exif, quality=98)
    from engine.video_io import read_image

    from_path = pipe.prepare_image(read_image(str(tmp_path / "c.jpg")), cfg.height, cfg.width, 1)
    from_pil = pipe.prepare_image(Image.open(tmp_path / "c.jpg"), cfg.height, cfg.width, 1)
    torch.testing.assert_close(from_path, from_pil)
    want = torch.from_numpy(np.rot90(_blocks(cfg.width, cfg.height), -1).copy()).permute(2, 0, 1).double() / 255 * 2 - 1
    assert (from_pil[0].double() - want).abs().max().item() < 0.1
