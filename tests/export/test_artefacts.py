"""engine.artefacts: the export and plan folder formats that export/ writes and the backends read."""

import json

import pytest
import torch

from engine import artefacts


def test_read_plans_one_reader_for_builder_and_backend(tmp_path):
    """The plan manifest has one reader: a folder without plans.json is refused with one line naming it
    (or read as empty where a build is about to fill it), and a corrupt one names the file."""
    import engine.backends.tensorrt as backend
    import export.tensorrt_build as builder

    assert builder.read_plans is backend.read_plans is artefacts.read_plans
    with pytest.raises(ValueError, match=rf"not a TensorRT plan folder \(no plans.json\): '{tmp_path}'") as info:
        artefacts.read_plans(str(tmp_path))
    assert "\n" not in str(info.value)
    assert artefacts.read_plans(str(tmp_path), missing_ok=True) == {}
    data = {"tensorrt": "10.15.1", "networks": {"motion_dit": {"plan": f"motion_dit-{'a' * 16}.plan"}}}
    (tmp_path / artefacts.PLANS_MANIFEST).write_text(json.dumps(data))
    assert artefacts.read_plans(str(tmp_path)) == data
    (tmp_path / artefacts.PLANS_MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*plans.json"):
        artefacts.read_plans(str(tmp_path))


def test_check_weights_names_the_folder_and_the_remedy():
    lin = torch.nn.Linear(3, 2)
    hashes = artefacts.weights_hashes(lin)
    artefacts.check_weights(hashes, lin, "the graphs in 'x'", "export again")
    artefacts.check_weights(hashes, lin.half(), "the graphs in 'x'", "export again")  # any recorded dtype
    with torch.no_grad():
        lin.weight.add_(1e-3)
    with pytest.raises(ValueError, match=r"^the graphs in 'x' were built from other weights than this model "
                                         r"\(sha256 [0-9a-f]{12}\); export again$"):
        artefacts.check_weights(hashes, lin, "the graphs in 'x'", "export again")


def test_hash_tokenizer_entry_round_trips(tmp_path):
    """The manifest's tokenizer entry (written by export) gives the runtime the same tokenizer back."""
    from engine.random_text import RandomTextEncoder

    enc = RandomTextEncoder(hidden_size=16, max_length=8, num_layers=1, vocab_size=777)
    entry = artefacts.tokenizer_entry(enc, str(tmp_path))
    assert entry == {"max_length": 8, "normalize_pooled": True, "kind": "hash", "vocab_size": 777}
    tok = artefacts.load_tokenizer(str(tmp_path), {"text_encoder": entry})
    assert tok.vocab_size == 777
    with pytest.raises(ValueError, match="has no text_encoder graph"):
        artefacts.load_tokenizer(str(tmp_path), {})


def test_locate_export_order(tmp_path, monkeypatch):
    """onnx_dir, then $CMD_ONNX_DIR, then the cache; none: one line with the command that makes one."""
    lin = torch.nn.Linear(2, 2)
    monkeypatch.setenv("CMD_CACHE", str(tmp_path))
    monkeypatch.setenv(artefacts.ONNX_DIR_ENV, "from-env")
    assert artefacts.locate_export(lin, torch.float32, "given") == "given"
    assert artefacts.locate_export(lin, torch.float32) == "from-env"
    monkeypatch.delenv(artefacts.ONNX_DIR_ENV)
    with pytest.raises(ValueError, match=r"no ONNX graphs for this model .*python -m export onnx"):
        artefacts.locate_export(lin, torch.float32)
