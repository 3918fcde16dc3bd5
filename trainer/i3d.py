"""I3D (Inception-v1 inflated to 3-D, Carreira & Zisserman 2017): the feature network of FVD.

The architecture and parameter names follow piergiaj/pytorch-i3d (``InceptionI3d``), a port of DeepMind's
Kinetics-400 I3D (the network behind TF-Hub's ``i3d-kinetics-400`` that FVD uses), so its weight file
(``rgb_imagenet.pt``: a plain state dict) loads as it is, with ``torch.load(weights_only=True)``, or from a
safetensors copy. FVD features are the 400 Kinetics logits averaged over time (Unterthiner et al. 2019).
Nothing here is downloaded: give the path of a local weights file.
"""

import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _same_padding(kernel: Sequence[int], stride: Sequence[int], size: Sequence[int]):
    """TensorFlow "SAME" padding for (t, h, w), as F.pad's (w0, w1, h0, h1, t0, t1)."""
    pads = []
    for k, s, n in zip(kernel, stride, size):
        total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pads.append((total // 2, total - total // 2))
    (t0, t1), (h0, h1), (w0, w1) = pads
    return (w0, w1, h0, h1, t0, t1)


class MaxPool3dSamePadding(nn.MaxPool3d):
    def forward(self, x):
        return super().forward(F.pad(x, _same_padding(self.kernel_size, self.stride, x.shape[2:])))


class Unit3D(nn.Module):
    """Conv3d (SAME padding) + BatchNorm (eps 1e-3) + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel=(1, 1, 1), stride=(1, 1, 1),
                 activation: bool = True, batch_norm: bool = True, bias: bool = False):
        super().__init__()
        self.kernel, self.stride, self.activation = tuple(kernel), tuple(stride), activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=0.001, momentum=0.01) if batch_norm else None

    def forward(self, x):
        x = self.conv3d(F.pad(x, _same_padding(self.kernel, self.stride, x.shape[2:])))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class InceptionModule(nn.Module):
    def __init__(self, in_channels: int, c: Sequence[int]):
        super().__init__()
        self.b0 = Unit3D(in_channels, c[0])
        self.b1a = Unit3D(in_channels, c[1])
        self.b1b = Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a = Unit3D(in_channels, c[3])
        self.b2b = Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a = MaxPool3dSamePadding((3, 3, 3), stride=(1, 1, 1), padding=0)
        self.b3b = Unit3D(in_channels, c[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """RGB I3D: (B, 3, T, H, W) in [-1, 1] -> logits (B, num_classes), averaged over time."""

    def __init__(self, num_classes: int = 400, in_channels: int = 3):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, (7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSamePadding((1, 3, 3), stride=(1, 2, 2), padding=0)
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSamePadding((1, 3, 3), stride=(1, 2, 2), padding=0)
        self.Mixed_3b = InceptionModule(192, (64, 96, 128, 16, 32, 32))
        self.Mixed_3c = InceptionModule(256, (128, 128, 192, 32, 96, 64))
        self.MaxPool3d_4a_3x3 = MaxPool3dSamePadding((3, 3, 3), stride=(2, 2, 2), padding=0)
        self.Mixed_4b = InceptionModule(480, (192, 96, 208, 16, 48, 64))
        self.Mixed_4c = InceptionModule(512, (160, 112, 224, 24, 64, 64))
        self.Mixed_4d = InceptionModule(512, (128, 128, 256, 24, 64, 64))
        self.Mixed_4e = InceptionModule(512, (112, 144, 288, 32, 64, 64))
        self.Mixed_4f = InceptionModule(528, (256, 160, 320, 32, 128, 128))
        self.MaxPool3d_5a_2x2 = MaxPool3dSamePadding((2, 2, 2), stride=(2, 2, 2), padding=0)
        self.Mixed_5b = InceptionModule(832, (256, 160, 320, 32, 128, 128))
        self.Mixed_5c = InceptionModule(832, (384, 192, 384, 48, 128, 128))
        self.logits = Unit3D(1024, num_classes, activation=False, batch_norm=False, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, layer in self.named_children():  # in definition order, the logits last
            if name != "logits":
                x = layer(x)
        # The reference pools with a (2, 7, 7) window, stride 1 (224-pixel inputs end at 7x7); smaller inputs
        # (tests) pool what there is.
        t, h, w = x.shape[2:]
        x = F.avg_pool3d(x, (min(2, t), min(7, h), min(7, w)), stride=1)
        return self.logits(x).mean(dim=(2, 3, 4))


def load_i3d(path: str) -> InceptionI3d:
    """An InceptionI3d with the weights of a local file (.safetensors, or a .pt/.pth state dict read with
    ``weights_only=True``: nothing is unpickled beyond tensors)."""
    if not os.path.isfile(path):
        raise ValueError(f"I3D weights file not found: {path!r}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable or not a plain state dict
        raise ValueError(f"cannot read I3D weights {path!r}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or "logits.conv3d.weight" not in state:
        raise ValueError(f"{path!r} is not an InceptionI3d state dict (no 'logits.conv3d.weight')")
    model = InceptionI3d(num_classes=state["logits.conv3d.weight"].shape[0])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path!r} does not match InceptionI3d: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval().requires_grad_(False)


class I3DFeatures:
    """FVD's feature network: videos (B, L, 3, H, W) in [-1, 1] -> I3D logits (B, 400), frames resized to
    ``size`` (224 in the FVD protocol) with bilinear interpolation."""

    def __init__(self, path: str, size: int = 224, device="cpu", batch_size: int = 8):
        self.model = load_i3d(path).to(device)
        self.size, self.device, self.batch_size = size, torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor) -> torch.Tensor:
        out = []
        for part in videos.split(self.batch_size):
            b, frames = part.shape[:2]
            x = part.float().reshape(b * frames, *part.shape[2:]).to(self.device)
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False).clamp(-1, 1)
            x = x.reshape(b, frames, 3, self.size, self.size).permute(0, 2, 1, 3, 4)
            out.append(self.model(x).float().cpu())
        return torch.cat(out)
