"""A text encoder with random weights that needs no files: a small transformers ``BertModel`` with
seeded weights and a hashing tokenizer. It has the :class:`engine.models.TextEncoder` interface
(``enc(prompts) -> (states (B, T, d), pooled (B, d))``, ``.hidden_size``, ``.max_length``), so GPU
tests and benchmarks run without MiniLM, and ``random:<config>`` models get one. The same seed gives
the same weights on every machine, and the same prompt always gives the same states."""

import re
import zlib
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from engine.models.text import encode_tokens

PAD, CLS, SEP = 0, 1, 2
_WORD = re.compile(r"\w+|[^\w\s]")


class HashTokenizer:
    """Lower-cased words and punctuation -> ids by CRC32 (stable across runs and machines, unlike
    Python's ``hash``), wrapped in [CLS] ... [SEP] and padded to ``max_length``."""

    def __init__(self, vocab_size: int = 8192):
        self.vocab_size = vocab_size

    def encode(self, text: str, max_length: int) -> List[int]:
        ids = [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in _WORD.findall(text.lower())]
        return [CLS] + ids[: max_length - 2] + [SEP]

    def num_tokens(self, text: str) -> int:
        """Tokens of ``text`` before truncation, [CLS] and [SEP] included."""
        return len(_WORD.findall(text.lower())) + 2

    def __call__(self, prompts: Sequence[str], max_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        rows = [self.encode(p, max_length) for p in prompts]
        ids = torch.full((len(rows), max_length), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), max_length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask


class RandomTextEncoder(nn.Module):
    """``hidden_size`` and ``max_length`` as the model's config asks; ``num_layers`` BERT layers."""

    def __init__(self, hidden_size: int = 384, max_length: int = 32, num_layers: int = 2, seed: int = 0,
                 vocab_size: int = 8192, normalize_pooled: bool = True):
        super().__init__()
        from transformers import BertConfig, BertModel  # lazily: importing transformers is slow

        heads = next(h for h in (8, 4, 2, 1) if hidden_size % h == 0)
        config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                            num_attention_heads=heads, intermediate_size=2 * hidden_size,
                            max_position_embeddings=max(max_length, 8))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = BertModel(config, add_pooling_layer=False).eval().requires_grad_(False)
        self.tokenizer = HashTokenizer(vocab_size)
        self.hidden_size = hidden_size
        self.max_length = max_length
        self.normalize_pooled = normalize_pooled

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_tokens(self, prompts: Sequence[str]) -> List[int]:
        """Tokens of each prompt before truncation (``TextEncoder.num_tokens``)."""
        return [self.tokenizer.num_tokens(p) for p in prompts]

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (token states (B, max_length, d), masked-mean pooled (B, d)), float32."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids, mask = self.tokenizer(list(prompts), self.max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        states, pooled = encode_tokens(self.model, ids, mask, self.normalize_pooled)
        return states.float(), pooled.float()
