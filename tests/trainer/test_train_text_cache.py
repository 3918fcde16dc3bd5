"""Caption embeddings: each caption encoded on its own (batch-independent), a cache file that trains a
text-conditioned stage without the text encoder (the GPU machines lack it), clear errors."""

import pytest
import torch

from engine.configs import TextEncoderConfig
from engine.models.text import TextEncoder
from trainer.text_cache import CaptionEmbeddings, main


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder.from_config(TextEncoderConfig())


def test_cache_matches_the_encoder_and_round_trips(tmp_path, encoder):
    cache = CaptionEmbeddings(lambda: encoder)
    captions = ["a red circle moving right", "", "a blue square sliding upward"]
    states, pooled = cache(captions)
    ref_states, ref_pooled = encoder(captions)
    assert states.shape == ref_states.shape and states.dtype == torch.float32
    # fp16 storage: within fp16 rounding of the encoder's own output.
    assert torch.allclose(states, ref_states, atol=2e-2, rtol=1e-2)
    assert torch.allclose(pooled, ref_pooled, atol=2e-3, rtol=1e-2)
    path = tmp_path / "captions.safetensors"
    cache.save(str(path))
    offline = CaptionEmbeddings(None)  # no encoder at all
    offline.load(str(path))
    assert len(offline) == 3
    s2, p2 = offline(captions[::-1])
    assert torch.equal(s2, states.flip(0)) and torch.equal(p2, pooled.flip(0))
    with pytest.raises(ValueError, match="not in the text cache"):
        offline(["a caption that was never encoded"])


def test_bad_cache_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        CaptionEmbeddings(None).load(str(bad))
    with pytest.raises(ValueError, match="not found"):
        CaptionEmbeddings(None).load(str(tmp_path / "missing.safetensors"))


def test_precompute_cli_covers_the_synthetic_captions(tmp_path):
    from trainer.data import SyntheticVideos

    out = tmp_path / "captions.safetensors"
    assert main(["--config", "default", "--num-clips", "12", "--out", str(out)]) == 0
    cache = CaptionEmbeddings(None)
    cache.load(str(out))
    data = SyntheticVideos(12)
    assert all(data[i]["caption"] in cache for i in range(12)) and "" in cache
