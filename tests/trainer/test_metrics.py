"""Metrics: the Frechet distance core on Gaussians with known distances, feature statistics, PSNR/SSIM on
cases with closed forms, the I3D feature network (random weights from a local file) and CLIPSIM."""

import json
import math

import numpy as np
import pytest
import torch

from trainer.metrics import (CLIPSimilarity, FeatureStats, frechet_distance, frechet_from_stats,
                             frechet_video_distance, psnr, ssim)


def random_spd(dim, gen):
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(dim, dtype=torch.float64)


def test_frechet_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)  # 5 + 4 + 1 + 0
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx(10.0)


def test_frechet_rotated_covariances_and_symmetry():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    d1, d2 = torch.tensor([1.0, 2, 3, 4, 5], dtype=torch.float64), torch.tensor([5.0, 1, 2, 2, 0.5], dtype=torch.float64)
    s1, s2 = q @ torch.diag(d1) @ q.T, q @ torch.diag(d2) @ q.T  # commuting: sqrt(S1 S2) = Q sqrt(D1 D2) Q^T
    mu = torch.zeros(5, dtype=torch.float64)
    expected = float(((d1.sqrt() - d2.sqrt()) ** 2).sum())
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-9)
    # General, non-commuting covariances: against scipy's matrix square root.
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a, b = random_spd(6, gen), random_spd(6, gen)
    m1, m2 = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    ref = float(((m1 - m2) ** 2).sum() + torch.trace(a) + torch.trace(b)
                - 2 * np.trace(scipy_linalg.sqrtm(a.numpy() @ b.numpy()).real))
    assert frechet_distance(m1, a, m2, b) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(m2, b, m1, a) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(m1, a, m1, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_from_samples_matches_the_distribution_distance():
    gen = torch.Generator().manual_seed(1)
    dim, n = 4, 40000
    cov1, cov2 = random_spd(dim, gen), random_spd(dim, gen)
    mu1, mu2 = torch.zeros(dim, dtype=torch.float64), torch.full((dim,), 0.5, dtype=torch.float64)
    exact = frechet_distance(mu1, cov1, mu2, cov2)
    a = torch.randn(n, dim, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov1).T + mu1
    b = torch.randn(n, dim, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov2).T + mu2
    sa, sb = FeatureStats(), FeatureStats()
    for part in a.split(7000):  # streamed in uneven chunks
        sa.add(part)
    sb.add(b)
    assert frechet_from_stats(sa, sb) == pytest.approx(exact, rel=0.05)
    # Merging per-rank statistics equals accumulating everything in one place.
    left, right = FeatureStats(), FeatureStats()
    left.add(a[:15000])
    right.add(a[15000:])
    merged = left.merge(right).mean_cov()
    assert torch.allclose(merged[0], sa.mean_cov()[0]) and torch.allclose(merged[1], sa.mean_cov()[1])


def test_frechet_video_distance_with_a_pluggable_feature_network():
    gen = torch.Generator().manual_seed(2)

    def mean_colour(videos):  # (B, L, 3, H, W) -> (B, 3)
        return videos.mean(dim=(1, 3, 4))

    real = [torch.rand(16, 2, 3, 4, 4, generator=gen) * 2 - 1 for _ in range(4)]
    shifted = [v + torch.tensor([0.3, 0.0, -0.4]).view(1, 1, 3, 1, 1) for v in real]
    # A constant shift moves only the mean: the distance is |shift|^2.
    assert frechet_video_distance(real, shifted, mean_colour) == pytest.approx(0.25, rel=1e-6)
    assert frechet_video_distance(real, real, mean_colour) == pytest.approx(0.0, abs=1e-9)


def test_frechet_shape_errors():
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="at least 2"):
        s = FeatureStats()
        s.add(torch.zeros(1, 3))
        s.mean_cov()


def test_psnr_known_values():
    x = torch.zeros(2, 4, 3, 8, 8)
    y = x.clone()
    y[0] += 0.02  # MSE 4e-4 on a range of 2: 10 log10(4 / 4e-4) = 40 dB
    y[1] += 0.2  # 20 dB
    assert psnr(y, x).tolist() == pytest.approx([40.0, 20.0], rel=1e-6)  # float32 inputs


def test_ssim_closed_form_and_order():
    a, b = 0.3, -0.2  # constant images: SSIM = (2ab + c1) / (a^2 + b^2 + c1), the structure term is 1
    c1 = (0.01 * 2) ** 2
    x, y = torch.full((1, 2, 3, 16, 16), a), torch.full((1, 2, 3, 16, 16), b)
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 3, 24, 24, generator=gen) * 2 - 1
    assert ssim(img, img).item() == pytest.approx(1.0, abs=1e-12)
    noise = torch.randn(img.shape, generator=gen)
    scores = [ssim(img, (img + s * noise).clamp(-1, 1)).item() for s in (0.05, 0.2, 0.8)]
    assert 1 > scores[0] > scores[1] > scores[2]


def test_i3d_features_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    from trainer.i3d import I3DFeatures, InceptionI3d, load_i3d

    torch.manual_seed(0)
    net = InceptionI3d(num_classes=10).eval()
    assert 12.0e6 < sum(p.numel() for p in InceptionI3d().parameters()) < 13.0e6  # the published I3D size
    torch.save(net.state_dict(), tmp_path / "i3d.pt")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "i3d.safetensors"))
    videos = torch.rand(2, 8, 3, 16, 16) * 2 - 1
    a = I3DFeatures(str(tmp_path / "i3d.pt"), size=32)(videos)
    b = I3DFeatures(str(tmp_path / "i3d.safetensors"), size=32)(videos)
    assert a.shape == (2, 10) and torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])
    torch.save({"something": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="InceptionI3d"):
        load_i3d(str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="not found"):
        load_i3d(str(tmp_path / "missing.pt"))


def tiny_clip_folder(path):
    """A random 1-layer CLIP with a tiny word-level vocabulary (no download)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(str(path))
    torch.manual_seed(0)
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, projection_dim=8, bos_token_id=0,
                eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8, projection_dim=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(str(path))
    return str(path)


def test_clipsim_is_the_mean_over_frames(tmp_path):
    scorer = CLIPSimilarity(tiny_clip_folder(tmp_path / "clip"))
    gen = torch.Generator().manual_seed(0)
    videos = torch.rand(2, 3, 3, 16, 16, generator=gen) * 2 - 1
    captions = ["a red circle moving right", "blue square"]
    scores = scorer(videos, captions)
    assert scores.shape == (2,) and bool(((scores >= -1) & (scores <= 1)).all())
    per_frame = torch.stack([scorer(videos[:, f:f + 1], captions) for f in range(3)], dim=1)
    assert torch.allclose(scores, per_frame.mean(1), atol=1e-6)
    swapped = scorer(videos.flip(0), captions[::-1])
    assert torch.allclose(swapped, scores.flip(0), atol=1e-6)
    assert not math.isclose(scorer(videos[:1], captions[1:]).item(), scores[0].item(), abs_tol=1e-6)
