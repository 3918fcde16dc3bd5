"""Stage 2b: the motion DiT, p(z | content frame, text), DESIGN 3.3.

Tokens: the noisy motion latent z (B, D, L, H'+W') patch-embedded (patch 2) -> N_z tokens, and the
content frame (B, C, H, W) patch-embedded by its own embedder (patch 4 or 8) -> N_c tokens, each set
with its own fixed 2-D sin-cos positions; full self-attention over [z ; content]; the output head reads
the z positions only. Conditioning: adaLN-Zero on c = timestep embedding + Linear(pooled text).
The official code ignored its condition; here the text always reaches every block.
"""

from typing import Optional

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

import cmd_kernels
from engine.models.layers import Attention, TimestepEmbedder, patchify, sincos_2d, unpatchify


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero: shift/scale/gate for attention and for the MLP from c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads, use_motion_kernel=True)
        inner = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(cmd_kernels.modulated_layernorm(x, shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(cmd_kernels.modulated_layernorm(x, shift_mlp, scale_mlp))


class MotionDiT(ModelMixin, ConfigMixin):
    config_name = "config.json"

    """The motion DiT. Its hyper-parameters, their defaults and meaning are the config's ``motion_dit``
    section (:class:`engine.configs.MotionDiTConfig`) plus the channels it works with (``motion_channels``
    = autoencoder.motion_dim, ``content_channels`` = channels, ``text_dim`` = text_encoder.hidden_size);
    build it from a config with :func:`engine.models.bundle.build_network`."""

    @register_to_config
    def __init__(self, *, motion_channels: int, content_channels: int, text_dim: int, depth: int, hidden_size: int,
                 num_heads: int, patch_size: int, content_patch_size: int, mlp_ratio: float):
        super().__init__()
        p, pc, d = patch_size, content_patch_size, hidden_size
        self.motion_embed = nn.Linear(p * p * motion_channels, d)  # PatchEmbed: conv with kernel = stride = p
        self.content_embed = nn.Linear(pc * pc * content_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.text_proj = nn.Linear(text_dim, d)
        # Replaces the pooled text where it is dropped (training) or absent (the unconditional CFG branch).
        self.null_text = nn.Parameter(torch.zeros(text_dim))
        self.blocks = nn.ModuleList(DiTBlock(d, num_heads, mlp_ratio) for _ in range(depth))
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final_linear = nn.Linear(d, p * p * motion_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, normal embeddings, zero adaLN and output (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.null_text, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_adaLN[-1], self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition(self, timestep: torch.Tensor, text: Optional[torch.Tensor],
                  drop_text: Optional[torch.Tensor] = None) -> torch.Tensor:
        """c = t_embed(t) + Linear(text). ``text=None`` uses the null text for the whole batch;
        ``drop_text`` (B,) bool replaces the text of those samples (classifier-free guidance training)."""
        b = timestep.shape[0]
        null = self.null_text.to(self.text_proj.weight.dtype)[None].expand(b, -1)
        if text is None:
            text = null
        elif drop_text is not None:
            text = torch.where(drop_text[:, None], null, text.to(null.dtype))
        return self.t_embedder(timestep) + self.text_proj(text.to(null.dtype))

    def embed(self, motion: torch.Tensor, timestep: torch.Tensor, content: torch.Tensor,
              text: Optional[torch.Tensor] = None, drop_text: Optional[torch.Tensor] = None):
        """The blocks' input: tokens x (B, N_z + N_c, d) = [patch-embedded z ; patch-embedded content frame]
        with their sin-cos positions, the condition c (B, d), and the z token grid (zh, zw) that
        :meth:`unembed` needs. ``forward`` = embed, every block, unembed."""
        cfg = self.config
        p, pc = cfg.patch_size, cfg.content_patch_size
        if motion.dim() != 4 or motion.shape[1] != cfg.motion_channels or motion.shape[2] % p or motion.shape[3] % p:
            raise ValueError(f"motion latent must be (B, {cfg.motion_channels}, L, N) with L, N divisible by {p}, "
                             f"got {tuple(motion.shape)}")
        if content.dim() != 4 or content.shape[1] != cfg.content_channels or content.shape[2] % pc or content.shape[3] % pc:
            raise ValueError(f"content frame must be (B, {cfg.content_channels}, H, W) with H, W divisible by {pc}, "
                             f"got {tuple(content.shape)}")
        b = motion.shape[0]
        timestep = torch.as_tensor(timestep, device=motion.device).reshape(-1).expand(b)
        z = self.motion_embed(patchify(motion, p))  # (B, L/p, N/p, d)
        k = self.content_embed(patchify(content.to(z.dtype), pc))  # (B, H/pc, W/pc, d)
        zh, zw, kh, kw, d = z.shape[1], z.shape[2], k.shape[1], k.shape[2], z.shape[3]
        z = z + sincos_2d(zh, zw, d, z.device, z.dtype)
        k = k + sincos_2d(kh, kw, d, k.device, k.dtype)
        x = torch.cat([z.reshape(b, zh * zw, d), k.reshape(b, kh * kw, d)], dim=1)
        c = self.condition(timestep, text, drop_text).to(x.dtype)
        return x, c, (zh, zw)

    def unembed(self, x: torch.Tensor, c: torch.Tensor, grid) -> torch.Tensor:
        """The output head on the blocks' output: final adaLN, linear, unpatchify of the z tokens only
        -> (B, D, L, H'+W')."""
        zh, zw = grid
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        x = self.final_linear(cmd_kernels.modulated_layernorm(x[:, : zh * zw], shift, scale))
        return unpatchify(x.reshape(x.shape[0], zh, zw, -1), self.config.patch_size, self.config.motion_channels)

    def forward(self, motion: torch.Tensor, timestep: torch.Tensor, content: torch.Tensor,
                text: Optional[torch.Tensor] = None, drop_text: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Noise prediction for z_t. motion (B, D, L, H'+W'), timestep (B,) or scalar, content (B, C, H, W),
        text (B, text_dim) pooled text or None -> (B, D, L, H'+W')."""
        x, c, grid = self.embed(motion, timestep, content, text, drop_text)
        for block in self.blocks:
            x = block(x, c)
        return self.unembed(x, c, grid)
