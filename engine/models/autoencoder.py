"""Stage 1: the CMD autoencoder (video -> content frame xbar + motion latent z -> video), DESIGN 3.1.

Shapes (p = patch size, H' = H/p, W' = W/p, C' = hidden size, D = motion dim):
    video  x    (B, L, C, H, W)        pixels in [-1, 1] (pixel mode) or scaled VAE latents (latent mode)
    content xbar (B, C, H, W)          a per-pixel convex combination of the frames
    motion z    (B, D, L, H' + W')     time-height plane, then time-width plane, in [-1, 1]
"""

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

import cmd_kernels
from engine.models.layers import SpaceTimeBlock, patchify, sincos_1d, sincos_2d, unpatchify


class CMDAutoencoder(ModelMixin, ConfigMixin):
    config_name = "config.json"

    """The stage-1 autoencoder. Its hyper-parameters, their defaults and meaning are the config's
    ``autoencoder`` section (:class:`engine.configs.AutoencoderConfig`); build it from a config with
    :func:`engine.models.bundle.build_network`."""

    @register_to_config
    def __init__(self, *, in_channels: int, patch_size: int, hidden_size: int, encoder_depth: int,
                 decoder_depth: int, num_heads: int, motion_dim: int, mlp_ratio: float, pixel_output: bool):
        super().__init__()
        c, p, d = in_channels, patch_size, hidden_size
        # Encoder f_B: patch embedding + divided space-time transformer.
        self.patch_embed = nn.Linear(p * p * c, d)
        self.encoder_blocks = nn.ModuleList(SpaceTimeBlock(d, num_heads, mlp_ratio) for _ in range(encoder_depth))
        self.encoder_norm = nn.LayerNorm(d)
        # Importance head f_I: a per-frame transposed conv with kernel = stride = p, written as a
        # linear to p*p*C values per token followed by unpatchify (the same map).
        self.importance_head = nn.Linear(d, p * p * c)
        # Motion head f_M: separate 1x1 convs (per-position linears) for the two planes.
        self.motion_head_height = nn.Linear(d, motion_dim)
        self.motion_head_width = nn.Linear(d, motion_dim)
        # Decoder: embeddings g_I (content patches) and g_M (motion planes), transformer g_B, output conv.
        self.content_embed = nn.Linear(p * p * c, d)
        self.motion_embed_height = nn.Linear(motion_dim, d)
        self.motion_embed_width = nn.Linear(motion_dim, d)
        self.decoder_blocks = nn.ModuleList(SpaceTimeBlock(d, num_heads, mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(d)
        self.output_head = nn.Linear(d, p * p * c)

    def encoder_modules(self):
        """The encoder side (f_B, f_I, f_M): what the diffusion stages read, frozen. Fine-tuning only the
        decoder afterwards keeps every content frame and motion latent they were trained on."""
        return [self.patch_embed, self.encoder_blocks, self.encoder_norm, self.importance_head,
                self.motion_head_height, self.motion_head_width]

    def _check_video(self, x: torch.Tensor) -> None:
        p, c = self.config.patch_size, self.config.in_channels
        if x.dim() != 5 or x.shape[2] != c or x.shape[3] % p or x.shape[4] % p:
            raise ValueError(f"expected a video (B, L, {c}, H, W) with H and W divisible by {p}, got {tuple(x.shape)}")

    def _positions(self, frames: int, hp: int, wp: int, like: torch.Tensor):
        """Fixed sin-cos positions: a time term (L, C') and a space term (H', W', C'); their sum is the
        3-D position of token (l, h, w). The official code built rotary embeddings and never applied them."""
        d = self.config.hidden_size
        pos_t = sincos_1d(frames, d, like.device, like.dtype)
        pos_hw = sincos_2d(hp, wp, d, like.device, like.dtype)
        return pos_t, pos_hw

    def encode(self, x: torch.Tensor):
        """Video (B, L, C, H, W) -> (content frame (B, C, H, W), motion latent (B, D, L, H'+W'))."""
        self._check_video(x)
        p, c = self.config.patch_size, self.config.in_channels
        b, frames, _, h, w = x.shape
        tokens = self.patch_embed(patchify(x, p))  # (B, L, H', W', C')
        hp, wp = tokens.shape[2], tokens.shape[3]
        pos_t, pos_hw = self._positions(frames, hp, wp, tokens)
        u = tokens + pos_t[None, :, None, None, :] + pos_hw[None, None]
        for block in self.encoder_blocks:
            u = block(u)
        u = self.encoder_norm(u)

        logits = unpatchify(self.importance_head(u), p, c)  # (B, L, C, H, W)
        content = cmd_kernels.content_frame(x, logits)

        z_height = self.motion_head_height(u.mean(dim=3))  # mean over W' -> (B, L, H', D)
        z_width = self.motion_head_width(u.mean(dim=2))  # mean over H' -> (B, L, W', D)
        motion = torch.tanh(torch.cat([z_height, z_width], dim=2)).permute(0, 3, 1, 2)  # (B, D, L, H'+W')
        return content, motion

    def decode(self, content: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """(content (B, C, H, W), motion (B, D, L, H'+W')) -> video (B, L, C, H, W)."""
        p, c = self.config.patch_size, self.config.in_channels
        if content.dim() != 4 or content.shape[1] != c or content.shape[2] % p or content.shape[3] % p:
            raise ValueError(f"expected a content frame (B, {c}, H, W) with H, W divisible by {p}, "
                             f"got {tuple(content.shape)}")
        hp, wp = content.shape[2] // p, content.shape[3] // p
        if motion.dim() != 4 or motion.shape[1] != self.config.motion_dim or motion.shape[3] != hp + wp:
            raise ValueError(f"motion latent {tuple(motion.shape)} does not fit content {tuple(content.shape)}: "
                             f"expected (B, {self.config.motion_dim}, L, {hp + wp})")
        frames = motion.shape[2]
        planes = motion.permute(0, 2, 3, 1)  # (B, L, H'+W', D)
        # Split at H': the first H' positions are the time-height plane (the official code split at H'
        # when decoding but W' when encoding, wrong for non-square inputs). One split, not two slices: under
        # torch 2.11's ONNX export the slices' sizes become data-dependent symbols that decoder_fusion's
        # shape check cannot guard on (GuardOnDataDependentSymNode); split's sizes stay hp and wp.
        plane_height, plane_width = planes.split([hp, wp], dim=2)
        v_height = self.motion_embed_height(plane_height)  # (B, L, H', C')
        v_width = self.motion_embed_width(plane_width)  # (B, L, W', C')
        v_content = self.content_embed(patchify(content, p))  # (B, H', W', C')
        pos_t, pos_hw = self._positions(frames, hp, wp, v_content)
        # The sum of per-axis positions folds into the planes, so the fused op reads only small planes.
        first = self.decoder_blocks[0]
        cube, normed = cmd_kernels.decoder_fusion(
            v_content + pos_hw, v_height + pos_t[:, None, :], v_width, first.norm_time.weight,
            first.norm_time.bias, first.norm_time.eps)
        x = first(cube, normed=normed)
        for block in self.decoder_blocks[1:]:
            x = block(x)
        out = unpatchify(self.output_head(self.decoder_norm(x)), p, c)  # (B, L, C, H, W)
        return 2 * torch.sigmoid(out) - 1 if self.config.pixel_output else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction: decode(encode(x))."""
        return self.decode(*self.encode(x))
