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
    rgba = np.concatenate([u8, np.full(u8.shape[:2] + (1,), 77, np.uint8)], axis=2)
    forms["PIL-RGBA"] = (Image.fromarray(rgba), 1e-6)  # alpha dropped, as for files
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
                     "--steps", "1", "--motion-steps", "1", "--quiet", "--out", str(out)]) == 0
    assert out.is_file()
    bad = np.full((16, 16), 3.0, np.float32)
    Image.fromarray(bad).save(tmp_path / "bright.tiff")
    capsys.readouterr()
    code = run_main(["--prompt", "moving left", "--model", model, "--image", str(tmp_path / "bright.tiff"),
                     "--quiet", "--out", str(tmp_path / "w.npy")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "bright.tiff" in err and "\n" not in err, err
    assert not (tmp_path / "w.npy").exists()
