"""A text encoder with random weights that needs no files: a small transformers ``BertModel`` with
seeded weights and a hashing tokenizer. It has the :class:`engine.models.TextEncoder` interface
(``enc(prompts) -> (states (B, T, d), pooled (B, d))``, ``.hidden_size``, ``.max_length``), so GPU
tests and benchmarks run without MiniLM, and ``random:<config>`` models get one. The same seed gives
the same weights on every machine, and the same prompt always gives the same states."""

import re
import zlib
from typing import Dict, List, Optional, Sequence, Union

import torch

from engine.models.text import TextEncoder, TokenEncoder

PAD, CLS, SEP = 0, 1, 2
_WORD = re.compile(r"\w+|[^\w\s]")


class HashTokenizer:
    """Lower-cased words and punctuation -> ids by CRC32 (stable across runs and machines, unlike
    Python's ``hash``), wrapped in [CLS] ... [SEP]. Called as a Hugging Face tokenizer is (what
    :class:`engine.models.TextEncoder` does with any tokenizer)."""

    def __init__(self, vocab_size: int = 8192):
        self.vocab_size = vocab_size

    def encode(self, text: str, max_length: Optional[int] = None) -> List[int]:
        """Ids of one text, [CLS] and [SEP] included; at most ``max_length`` (None: all)."""
        ids = [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in _WORD.findall(text.lower())]
        return [CLS] + (ids if max_length is None else ids[: max_length - 2]) + [SEP]

    def __call__(self, texts: Sequence[str], padding: Union[bool, str] = False, truncation: bool = False,
                 max_length: Optional[int] = None, return_tensors: Optional[str] = None) -> Dict:
        """``{"input_ids", "attention_mask"}``: lists of ids (``return_tensors=None``) or (B, T) int64
        tensors ("pt"), T = ``max_length`` with ``padding="max_length"``, else the longest row."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.encode(t, max_length if truncation else None) for t in texts]
        if return_tensors is None:
            return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        if return_tensors != "pt":
            raise ValueError(f"HashTokenizer returns lists or torch tensors ('pt'), not {return_tensors!r}")
        width = max_length if padding == "max_length" and max_length else max(map(len, rows), default=0)
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class RandomTextEncoder(TextEncoder):
    """A :class:`engine.models.TextEncoder` of a seeded random BERT and the hashing tokenizer:
    ``hidden_size`` and ``max_length`` as the model's config asks; ``num_layers`` BERT layers."""

    def __init__(self, hidden_size: int = 384, max_length: int = 32, num_layers: int = 2, seed: int = 0,
                 vocab_size: int = 8192, normalize_pooled: bool = True):
        from transformers import BertConfig, BertModel  # lazily: importing transformers is slow

        heads = next(h for h in (8, 4, 2, 1) if hidden_size % h == 0)
        config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                            num_attention_heads=heads, intermediate_size=2 * hidden_size,
                            max_position_embeddings=max(max_length, 8))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            bert = BertModel(config, add_pooling_layer=False)
        super().__init__(HashTokenizer(vocab_size), TokenEncoder(bert, normalize_pooled), max_length, hidden_size,
                         normalize_pooled)
