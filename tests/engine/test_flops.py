"""engine.flops: meta-device FLOP counts of CMD sampling and of the ModelScope UNet3D baseline.

The SD-2.1-scale counts are checked against the paper's Table 9 (fvcore accounting) and against
counts by hand; the attention tally against FlopCounterMode's own SDPA count and a custom op."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.configs import load_config
from engine.flops import PAPER_TABLE9, count_evaluation, count_flops, main, measure, summarize

SD21 = "sd21-512x1024"


@pytest.fixture(scope="module")
def sd21_costs():
    return measure(SD21)


def _ae_decoder_macs(cfg, frames):
    """Multiply-adds of one AE decode by hand (biases and norms aside, as FlopCounterMode counts):
    per token and block, time and space attention projections 2 x 4d^2 and a GEGLU d -> 2rd -> d (3rd^2);
    plus the content/motion embeddings and the output head. Attention products apart."""
    a = cfg.autoencoder
    d, p, c, dm = a.hidden_size, a.patch_size, cfg.channels, a.motion_dim
    hp, wp = cfg.latent_height // p, cfg.latent_width // p
    tokens = frames * hp * wp
    linear = tokens * a.decoder_depth * (8 + 3 * a.mlp_ratio) * d * d
    linear += hp * wp * p * p * c * d + frames * (hp + wp) * dm * d + tokens * d * p * p * c
    # Score and value products: time attention over L at each of H'W' places, space over H'W' per frame.
    attention = a.decoder_depth * 2 * d * (hp * wp * frames ** 2 + frames * (hp * wp) ** 2)
    return int(linear), int(attention)


def test_paper_accounting_lands_on_table9(sd21_costs):
    r = summarize(sd21_costs, SD21, steps=50, accounting="paper")
    print(json.dumps({k: r[k] for k in ("cmd", "baseline", "ratio", "per_step", "vae_decode")}))
    assert r["paper"] == PAPER_TABLE9[50]
    assert abs(r["cmd"]["total"] / 46.8 - 1) < 0.03
    assert abs(r["baseline"]["total"] / 939.0 - 1) < 0.03
    assert 18 < r["ratio"] < 22  # Table 9: 939.0 / 46.8 = 20.1
    # The hand counts (T multiply-adds): SD-2.1 UNet 0.68 a 64x128 step without attention,
    # DiT-XL/2 0.23 at 512 tokens, the AE decoder 1.2 once.
    assert abs(r["per_step"]["content"] / 0.68 - 1) < 0.03
    assert abs(r["per_step"]["motion"] / 0.23 - 1) < 0.03
    assert abs(r["cmd"]["decoder"] / 1.2 - 1) < 0.05
    stages = r["cmd"]["content"] + r["cmd"]["motion"] + r["cmd"]["decoder"]
    assert math.isclose(r["cmd"]["total"], stages, rel_tol=1e-5)
    assert r["networks"]["content_unet"]["evals"] == 50 and r["networks"]["ae_decoder"]["evals"] == 1
    # The image VAE is reported apart, and it is big: leaving it out matters.
    assert r["vae_decode"] > 10 and r["vae_decode"] < r["cmd"]["total"]
    assert any("within 10%" in n and n.startswith("CMD") for n in r["notes"])


def test_ae_decoder_matches_a_count_by_hand(sd21_costs):
    cfg = load_config(SD21)
    linear, attention = _ae_decoder_macs(cfg, cfg.num_frames)
    cost = sd21_costs["ae_decoder"]
    assert cost.flops == 2 * linear
    assert cost.attention_flops == 2 * attention
    # Only the decoder's weights (about half the paper's 71M AE): the encoder does not run when sampling.
    assert 0.4 * 71e6 < cost.params < 0.6 * 71e6


def test_dit_tokens_and_count_by_hand(sd21_costs):
    """DiT-XL/2 at 384 z tokens + 128 content tokens: 28 blocks of 4d^2 (attention) + 8d^2 (MLP) per token,
    the rest (embeddings, adaLN on one vector, head) under 1%."""
    cfg = load_config(SD21)
    d, depth, tokens = cfg.motion_dit.hidden_size, cfg.motion_dit.depth, 384 + 128
    blocks = depth * tokens * 12 * d * d
    cost = sd21_costs["motion_dit"]
    assert blocks <= cost.flops / 2 < 1.01 * blocks
    assert cost.attention_flops == depth * 2 * 2 * tokens * tokens * d


def test_full_accounting_counts_cfg_attention_and_two_flops_per_mac(sd21_costs):
    paper = summarize(sd21_costs, SD21, steps=50, accounting="paper")
    full = summarize(sd21_costs, SD21, steps=50, accounting="full")
    for name in ("content_unet", "motion_dit", "baseline_unet3d"):
        p, f = paper["networks"][name], full["networks"][name]
        assert f["evals"] == 2 * p["evals"] == 100
        assert math.isclose(f["tflops_per_eval"], 2 * p["tflops_per_eval"] + f["attention_tflops_per_eval"],
                            rel_tol=1e-4)
    dec_p, dec_f = paper["networks"]["ae_decoder"], full["networks"]["ae_decoder"]
    assert dec_f["evals"] == 1
    assert math.isclose(dec_f["total"], 2 * dec_p["total"] + dec_f["attention_tflops_per_eval"], rel_tol=1e-4)
    assert full["cmd"]["total"] > 4 * paper["cmd"]["total"]
    # More than 10% off the table: the notes say why, and what the same count gives in paper accounting.
    cmd_note = next(n for n in full["notes"] if n.startswith("CMD"))
    assert "CFG" in cmd_note and "attention" in cmd_note and f"{paper['cmd']['total']:.4g}" in cmd_note


def test_steps_scale_the_denoisers_only(sd21_costs):
    r50 = summarize(sd21_costs, SD21, steps=50)
    r100 = summarize(sd21_costs, SD21, steps=100)
    assert math.isclose(r100["cmd"]["content"], 2 * r50["cmd"]["content"], rel_tol=1e-5)
    assert r100["cmd"]["decoder"] == r50["cmd"]["decoder"]
    assert abs(r100["cmd"]["total"] / PAPER_TABLE9[100]["cmd"] - 1) < 0.03
    r7 = summarize(sd21_costs, SD21, steps=7)
    assert r7["paper"] is None and any("no Table 9 comparison" in n for n in r7["notes"])


def test_frames_scale_motion_decoder_and_baseline_not_content():
    r16 = count_flops("default", steps=2, frames=16)
    r32 = count_flops("default", steps=2, frames=32)
    assert r32["cmd"]["content"] == r16["cmd"]["content"]
    assert r32["video"] == [32, 32, 32] and r32["vae_decode"] is None  # pixel config: no image VAE
    # The baseline and the decoder work on every frame: their linear layers scale with L.
    assert abs(r32["baseline"]["total"] / r16["baseline"]["total"] - 2) < 0.02
    assert abs(r32["cmd"]["decoder"] / r16["cmd"]["decoder"] - 2) < 0.02
    # The DiT's z tokens double, its content tokens do not.
    assert 1.2 < r32["cmd"]["motion"] / r16["cmd"]["motion"] < 2


class _Attend(nn.Module):
    def __init__(self, attend):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.attend = attend

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 4, 8).permute(2, 0, 3, 1, 4)
        return self.attend(q, k, v)


@torch.library.custom_op("test_flops::fake_attention", mutates_args=())
def _fake_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


@_fake_attention.register_fake
def _(q, k, v):
    return torch.empty_like(q)


def test_attention_is_counted_apart_for_sdpa_and_custom_ops():
    """FlopCounterMode counts SDPA on meta as its bmm's but a custom op's fake impl as nothing: the tally
    gives both the same attention count, and keeps it out of the other ops."""
    batch, tokens = 3, 10
    expected_attention = 2 * batch * 4 * tokens * tokens * (8 + 8)
    expected_linear = 2 * batch * tokens * 32 * 96
    for attend in (F.scaled_dot_product_attention, _fake_attention):
        with torch.device("meta"):
            net = _Attend(attend)
            x = torch.empty(batch, tokens, 32)
        cost = count_evaluation(net, lambda: net(x))
        assert cost.attention_flops == expected_attention, attend
        assert cost.flops == expected_linear and set(cost.by_op) == {"aten.addmm"}, (attend, cost.by_op)


def test_cli_json_is_the_last_line(sd21_costs, capsys):
    assert main(["--config", SD21, "--steps", "50", "--accounting", "paper", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert {"config", "steps", "accounting", "cmd", "baseline", "ratio"} <= set(result)
    assert set(result["cmd"]) == {"content", "motion", "decoder", "total"}
    assert set(result["baseline"]) == {"name", "total"}
    assert result["cmd"] == summarize(sd21_costs, SD21, 50, "paper")["cmd"]
    assert any(line.startswith("CMD total") for line in out)


@pytest.mark.parametrize("kwargs, bad", [({"steps": 0}, "0"), ({"accounting": "fvcore"}, "fvcore"),
                                         ({"frames": 15}, "15")])
def test_bad_arguments_fail_before_counting(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        count_flops("default", **kwargs)


def test_cli_bad_input_is_one_line_and_exit_code_2():
    proc = subprocess.run([sys.executable, "-m", "engine.flops", "--config", "default", "--frames", "7"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "7" in proc.stderr and "Traceback" not in proc.stderr
