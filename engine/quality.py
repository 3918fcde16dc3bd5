"""Image and video similarity: PSNR and SSIM of tensors, used by the engine's benchmarks (a cached
video against the uncached one) and by the trainer's evaluation (reconstructions against data).

Videos are float tensors (B, L, C, H, W) (or images (B, C, H, W)) in a range of width ``data_range``
([-1, 1]: 2, the default; [0, 1]: pass 1.0).
"""

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-clip PSNR (dB) of videos (B, ...) in a range of width ``data_range`` ([-1, 1]: 2)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-20))


def _gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    r = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-clip SSIM (Wang et al. 2004: Gaussian window 11 / 1.5, K1 0.01, K2 0.03, valid region), the mean
    over frames and channels, of videos (B, L, C, H, W) (or images (B, C, H, W)). The window shrinks to fit
    frames smaller than 11 pixels."""
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() == 4:
        x, y = x[:, None], y[:, None]
    b, frames, c, h, w = x.shape
    window = min(window, h, w)
    g = _gaussian_window(window, sigma).to(x.device)
    x = x.double().reshape(b * frames * c, 1, h, w)
    y = y.double().reshape(b * frames * c, 1, h, w)

    def blur(t):
        t = F.conv2d(t, g.view(1, 1, -1, 1))
        return F.conv2d(t, g.view(1, 1, 1, -1))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x ** 2
    syy = blur(y * y) - mu_y ** 2
    sxy = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.reshape(b, -1).mean(1)


