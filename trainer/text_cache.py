"""Caption embeddings for training: the text encoder is frozen, so each caption is encoded once and
kept (in memory, fp16: compact), caption -> (token states (T, d), pooled (d,)).

Each new caption is encoded on its own, never batched with others, so its embedding does not depend on
which batch it first appeared in: a resumed run (with an empty cache) sees bit-identical embeddings.

A cache can be written to and read from a safetensors file (``states`` (N, T, d), ``pooled`` (N, d) and the
captions in the metadata). On machines without the text encoder (DESIGN 8: the GPU machines lack the
MiniLM package) the trainer runs from such a file alone, computed on a CPU machine beforehand::

    python -m trainer.text_cache --config default --data synthetic --num-clips 20000 --out captions.safetensors
"""

import json
import os
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.atomic import atomic_path
from engine.cli import TRAIN_SEED_MAX, Int, Parser, run_main


class CaptionEmbeddings:
    """caption list -> (states (B, T, d), pooled (B, d)) float32 on ``device``.

    ``encoder_factory`` builds the text encoder on the first caption that is not cached (so a complete
    cache file needs no encoder at all)."""

    def __init__(self, encoder_factory: Optional[Callable[[], torch.nn.Module]], device=None,
                 dtype: torch.dtype = torch.float16):
        self._factory = encoder_factory
        self._encoder = None
        self.device = torch.device(device or "cpu")
        self.dtype = dtype
        self._cache: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, caption: str) -> bool:
        return caption in self._cache

    def _encoder_for(self, caption: str):
        if self._encoder is None:
            if self._factory is None:
                raise ValueError(f"caption {caption!r} is not in the text cache and there is no text encoder")
            try:
                self._encoder = self._factory()
            except (RuntimeError, OSError) as e:  # e.g. the MiniLM package is not installed on this machine
                raise ValueError(f"caption {caption!r} is not in the text cache and the text encoder cannot "
                                 f"load: {str(e).splitlines()[0]}") from None
        return self._encoder

    def _encode_one(self, caption: str) -> Tuple[torch.Tensor, torch.Tensor]:
        states, pooled = self._encoder_for(caption)([caption])
        return states[0].to("cpu", self.dtype), pooled[0].to("cpu", self.dtype)

    def add(self, captions: Iterable[str]) -> None:
        for caption in captions:
            if caption not in self._cache:
                self._cache[caption] = self._encode_one(caption)

    def __call__(self, captions: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            captions = [captions]
        self.add(captions)
        states = torch.stack([self._cache[c][0] for c in captions])
        pooled = torch.stack([self._cache[c][1] for c in captions])
        return states.to(self.device, torch.float32), pooled.to(self.device, torch.float32)

    def save(self, path: str) -> None:
        """Write the cache to a safetensors file, atomically."""
        captions = sorted(self._cache)
        if not captions:
            raise ValueError("the text cache is empty: nothing to save")
        tensors = {"states": torch.stack([self._cache[c][0] for c in captions]).contiguous(),
                   "pooled": torch.stack([self._cache[c][1] for c in captions]).contiguous()}
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, tmp, metadata={"captions": json.dumps(captions)})

    def load(self, path: str) -> None:
        """Add every caption of a cache file written by ``save``."""
        if not os.path.isfile(path):
            raise ValueError(f"text cache file not found: {path!r}")
        try:
            with safe_open(path, framework="pt") as f:
                captions = json.loads(f.metadata()["captions"])
                states, pooled = f.get_tensor("states"), f.get_tensor("pooled")
        except Exception as e:  # safetensors raises several kinds on a bad file
            raise ValueError(f"cannot read text cache {path!r}: {str(e).splitlines()[0]}") from None
        for i, caption in enumerate(captions):
            self._cache[caption] = (states[i].to(self.dtype), pooled[i].to(self.dtype))


def main(argv: Optional[List[str]] = None) -> int:
    from engine.atomic import check_output
    from engine.configs import load_config
    from engine.models.text import TextEncoder
    from trainer.data import SyntheticVideos

    parser = Parser(prog="python -m trainer.text_cache",
                    description="Precompute caption embeddings of the synthetic data set")
    parser.add_argument("--config", default="default")
    parser.add_argument("--data", default="synthetic", choices=["synthetic"])
    parser.add_argument("--num-clips", type=Int(), default=20000)
    parser.add_argument("--seed", type=Int(0, TRAIN_SEED_MAX), default=0, help="the trainer's --seed")
    parser.add_argument("--out", required=True)

    def body() -> int:
        args = parser.parse_args(argv)
        check_output(args.out)  # before the text encoder runs
        cfg = load_config(args.config)
        data = SyntheticVideos(args.num_clips, cfg.num_frames, cfg.height, cfg.width, seed=args.seed)
        captions = sorted({data[i]["caption"] for i in range(len(data))} | {""})
        cache = CaptionEmbeddings(lambda: TextEncoder.from_config(cfg.text_encoder))
        cache.add(captions)
        cache.save(args.out)
        print(f"{len(captions)} captions -> {args.out}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
