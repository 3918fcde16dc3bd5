"""FLOPs of one CMD video and of the video-UNet baseline, counted on the meta device (no weights, any
scale, on a CPU in seconds).

Every network is run once on meta tensors under ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs
per multiply-add of each matmul and convolution). Attention is tallied apart: a function mode sees each
``scaled_dot_product_attention`` call (and any custom ``*attention*`` op, such as a Triton kernel
registered with a fake implementation, which the counter alone would count as zero), counts its score
and value products (q k^T and p v: 4 * batch * heads * N_q * N_k * head_dim FLOPs) and takes whatever
the counter saw inside the call out of the other ops. One video then costs

    content = steps x UNet evaluations   motion = steps x DiT evaluations   decoder = AE decode once
    baseline = steps x UNet3D evaluations (ModelScope T2V at the same latent size)

with the image VAE decode reported apart (the paper leaves it out). Two accountings:

- ``paper``: as CMD's Table 9, counted with fvcore: one multiply-add = one FLOP, attention score/value
  products not counted (fvcore does not see memory-efficient attention kernels), one denoiser
  evaluation per step (no CFG batch), the image VAE excluded.
- ``full``: 2 FLOPs per multiply-add, attention included, the CFG batch (2 denoiser evaluations a step).

``python -m engine.bench flops --config sd21-512x1024 --steps 50 [--accounting paper|full] --json``
(or ``python -m engine.flops ...``) prints a table and, with ``--json``, the result as the last line.
"""

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from engine.baseline import BASELINE_NAME, MODELSCOPE_UNET3D_CONFIG, TEXT_TOKENS, build_baseline_unet
from engine.cli import Int, Parser, run_main
from engine.configs import CMDConfig, load_config
from engine.geometry import ClipSize, frame_step
from engine.models import CMDModel

__all__ = ["ACCOUNTINGS", "MODELSCOPE_UNET3D_CONFIG", "PAPER_TABLE9", "NetworkCost", "count_evaluation",
           "count_flops", "measure", "summarize", "main"]

ACCOUNTINGS = ("paper", "full")
TERA = 1e12

# CMD Table 9 (sampling a 16x512x1024 video; TFLOPs counted with fvcore), by step count.
PAPER_CONFIG = "sd21-512x1024"
PAPER_FRAMES = 16
PAPER_TABLE9 = {50: {"cmd": 46.8, "baseline": 939.0}, 100: {"cmd": 92.1, "baseline": 1877.9}}

# Networks in the order they run; the denoisers run once per step, the decoders once per video.
DENOISERS = ("content_unet", "motion_dit", "baseline_unet3d")
STAGE_OF = {"content": "content_unet", "motion": "motion_dit", "decoder": "ae_decoder"}


@dataclass
class NetworkCost:
    """One evaluation of one network (batch 1), in FlopCounterMode FLOPs (2 per multiply-add).
    ``flops`` excludes the attention score/value products, which are ``attention_flops``."""

    params: int
    flops: int
    attention_flops: int
    by_op: Dict[str, int] = field(default_factory=dict)
    shape: tuple = ()  # what one evaluation works on: the (latent) frame, motion latent or video


class _AttentionTally(TorchFunctionMode):
    """Counts attention score/value products from the call's shapes and records what the FLOP counter
    saw inside each attention call, per op, so that it can be taken out of the other ops."""

    def __init__(self, counter: FlopCounterMode):
        super().__init__()
        self.counter = counter
        self.flops = 0
        self.inside: Dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _is_attention(func):
            return func(*args, **kwargs)
        before = dict(self.counter.get_flop_counts().get("Global", {}))
        out = func(*args, **kwargs)
        for op, n in self.counter.get_flop_counts().get("Global", {}).items():
            if n != before.get(op, 0):
                self.inside[str(op)] = self.inside.get(str(op), 0) + n - before.get(op, 0)
        self.flops += _attention_flops(*args[:3])
        return out


def _is_attention(func) -> bool:
    if func is F.scaled_dot_product_attention:
        return True
    # Custom ops (torch.library) of attention, e.g. a Triton kernel whose fake impl computes nothing.
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        name = func.name() if isinstance(func, torch._ops.OpOverload) else str(func)
        return "attention" in name and "backward" not in name
    return False


def _attention_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """q k^T and p v of softmax(q k^T) v: q (..., N_q, d), k (..., N_k, d), v (..., N_k, d_v)."""
    batch = math.prod(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]))
    n_q, n_k, d, d_v = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    return 2 * batch * n_q * n_k * (d + d_v)


def count_evaluation(network: torch.nn.Module, run: Callable[[], object], shape: tuple = ()) -> NetworkCost:
    """Count one call of ``run()`` (which evaluates ``network``, normally on meta tensors): matmul and
    convolution FLOPs by op, with the attention score/value products taken apart."""
    counter = FlopCounterMode(display=False)
    tally = _AttentionTally(counter)
    with torch.no_grad(), counter, tally:
        run()
    by_op = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    for op, n in tally.inside.items():
        by_op[op] -= n
    by_op = {op: n for op, n in sorted(by_op.items()) if n}
    return NetworkCost(params=sum(p.numel() for p in network.parameters()), flops=sum(by_op.values()),
                       attention_flops=tally.flops, by_op=by_op, shape=shape)


def _resolve(config: Union[str, CMDConfig]) -> CMDConfig:
    return config if isinstance(config, CMDConfig) else load_config(config)


def _check_frames(cfg: CMDConfig, frames: Optional[int]) -> int:
    """Frames of a clip at the config's own height and width that fits its networks (any length the
    networks run, not only the sizes the model serves: FLOPs are counted for any scale)."""
    frames = cfg.num_frames if frames is None else frames
    patch = frame_step(cfg)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or frames % patch:
        raise ValueError(f"frames must be a positive multiple of the motion DiT patch size {patch}, got {frames!r}")
    return frames


def _check_args(cfg: CMDConfig, steps: int, accounting: str, frames: Optional[int],
                motion_steps: Optional[int] = None) -> int:
    for name, value in (("steps", steps), ("motion_steps", steps if motion_steps is None else motion_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if accounting not in ACCOUNTINGS:
        raise ValueError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}")
    return _check_frames(cfg, frames)


def measure(config: Union[str, CMDConfig], frames: Optional[int] = None) -> Dict[str, NetworkCost]:
    """One evaluation of each network for one video of ``frames`` frames (default: the config's),
    counted on the meta device: content_unet, motion_dit, ae_decoder, vae_decoder (latent mode: all
    frames), baseline_unet3d (ModelScope's UNet3D on the same latent video)."""
    cfg = _resolve(config)
    frames = _check_frames(cfg, frames)
    model = CMDModel.from_config(cfg, device="meta")
    baseline = build_baseline_unet(in_channels=cfg.channels, device="meta")
    geo = cfg.geometry(ClipSize(frames, cfg.height, cfg.width))
    c, h, w = geo.content_shape
    text = cfg.text_encoder
    costs = {}
    meta = {"device": "meta"}  # inputs made on meta directly: a device context would add a mode to every call
    t = torch.zeros(1, **meta)
    content = torch.empty(1, *geo.content_shape, **meta)
    motion = torch.empty(1, *geo.motion_shape, **meta)
    states = torch.empty(1, text.max_length, text.hidden_size, **meta)
    pooled = torch.empty(1, text.hidden_size, **meta)
    costs["content_unet"] = count_evaluation(model.content_unet, lambda: model.content_unet(
        content, t, encoder_hidden_states=states), tuple(content.shape))
    costs["motion_dit"] = count_evaluation(model.motion_dit, lambda: model.motion_dit(motion, t, content, pooled),
                                           tuple(motion.shape))
    costs["ae_decoder"] = count_evaluation(model.autoencoder, lambda: model.autoencoder.decode(content, motion),
                                           (frames, c, h, w))
    if model.vae is not None:
        latents = torch.empty(frames, c, h, w, **meta)
        costs["vae_decoder"] = count_evaluation(model.vae, lambda: model.vae.decode(latents), tuple(latents.shape))
    video = torch.empty(1, c, frames, h, w, **meta)  # UNet3D layout (B, C, L, h, w)
    baseline_states = torch.empty(1, TEXT_TOKENS, baseline.config.cross_attention_dim, **meta)
    costs["baseline_unet3d"] = count_evaluation(baseline, lambda: baseline(
        video, t, encoder_hidden_states=baseline_states), tuple(video.shape))
    # The AE's encoder is not part of sampling: count only the decoder's parameters.
    ae = model.autoencoder
    costs["ae_decoder"].params = sum(p.numel() for name, p in ae.named_parameters()
                                     if not name.startswith(("patch_embed", "encoder_", "importance_head",
                                                             "motion_head")))
    return costs


def _tflops(cost: NetworkCost, accounting: str) -> float:
    """One evaluation in TFLOPs under ``accounting`` (paper: multiply-adds, attention products left out)."""
    if accounting == "paper":
        return cost.flops / 2 / TERA
    return (cost.flops + cost.attention_flops) / TERA


def _sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def summarize(costs: Dict[str, NetworkCost], config: Union[str, CMDConfig], steps: int = 50,
              accounting: str = "paper", frames: Optional[int] = None, motion_steps: Optional[int] = None) -> dict:
    """Per-video TFLOPs from ``measure``'s per-evaluation costs (see ``count_flops``)."""
    cfg = _resolve(config)
    frames = _check_args(cfg, steps, accounting, frames, motion_steps)
    motion_steps = steps if motion_steps is None else motion_steps
    cfg_batch = 2 if accounting == "full" else 1
    unit = 2 if accounting == "paper" else 1  # paper: multiply-adds (FlopCounterMode FLOPs / 2)
    networks = {}
    for name, cost in costs.items():
        n_steps = motion_steps if name == "motion_dit" else steps
        evals = n_steps * cfg_batch if name in DENOISERS else 1
        per_eval = _tflops(cost, accounting)
        by_op = {op: _sig(n / unit / TERA) for op, n in cost.by_op.items()}
        if accounting == "full":
            by_op["attention"] = _sig(cost.attention_flops / TERA)
        networks[name] = {
            "params": cost.params,
            "shape": list(cost.shape),
            "evals": evals,
            "tflops_per_eval": _sig(per_eval),
            # Attention score/value products of one evaluation; in the total only in full accounting.
            "attention_tflops_per_eval": _sig(cost.attention_flops / unit / TERA),
            "attention_counted": accounting == "full",
            "total": _sig(per_eval * evals),
            "by_op_tflops_per_eval": by_op,
        }
    stages = {stage: networks[name]["total"] for stage, name in STAGE_OF.items()}
    cmd_total = _sig(sum(_tflops(costs[name], accounting) * networks[name]["evals"] for name in STAGE_OF.values()))
    baseline_total = networks["baseline_unet3d"]["total"]
    result = {
        "config": cfg.name,
        "steps": steps,
        "motion_steps": motion_steps,
        "accounting": accounting,
        "frames": frames,
        "video": [frames, cfg.height, cfg.width],
        "cmd": {**stages, "total": cmd_total},
        "baseline": {"name": BASELINE_NAME, "total": baseline_total},
        "ratio": _sig(baseline_total / cmd_total, 4),
        "per_step": {"content": _sig(networks["content_unet"]["total"] / steps),
                     "motion": _sig(networks["motion_dit"]["total"] / motion_steps),
                     "baseline": _sig(baseline_total / steps)},
        "vae_decode": networks["vae_decoder"]["total"] if "vae_decoder" in networks else None,
        "networks": networks,
    }
    result["paper"] = _table9(cfg, frames, steps) if motion_steps == steps else None
    result["notes"] = _notes(result, costs, cfg, steps, frames, accounting, motion_steps)
    return result


def count_flops(config: Union[str, CMDConfig], steps: int = 50, accounting: str = "paper",
                frames: Optional[int] = None, motion_steps: Optional[int] = None) -> dict:
    """TFLOPs to sample one video with CMD (content UNet, motion DiT, AE decoder; the image VAE decode
    apart) and with the ModelScope UNet3D baseline at the same latent size and steps.

    Returns ``{"config", "steps", "accounting", "cmd": {"content", "motion", "decoder", "total"},
    "baseline": {"name", "total"}, "ratio"}`` plus ``frames``, ``per_step``, ``vae_decode``, per-network
    details (``networks``: params, TFLOPs per evaluation, attention, evaluations, by op), Table 9's
    figures where they apply (``paper``) and ``notes`` on how and why ours differs from them.
    ``motion_steps``: the motion DiT's steps where they differ from the content model's (``steps``)."""
    cfg = _resolve(config)
    _check_args(cfg, steps, accounting, frames, motion_steps)  # before the seconds of counting
    return summarize(measure(cfg, frames), cfg, steps, accounting, frames, motion_steps)


def _table9(cfg: CMDConfig, frames: int, steps: int) -> Optional[dict]:
    if cfg.name != PAPER_CONFIG or frames != PAPER_FRAMES or steps not in PAPER_TABLE9:
        return None
    return dict(PAPER_TABLE9[steps])


def _notes(result: dict, costs: Dict[str, NetworkCost], cfg: CMDConfig, steps: int, frames: int,
           accounting: str, motion_steps: int) -> List[str]:
    notes = []
    if accounting == "paper":
        notes.append("paper accounting: TFLOPs = 10^12 multiply-adds (fvcore's convention), attention score/value "
                     "products not counted, one denoiser evaluation per step (no CFG batch), image VAE excluded")
    else:
        notes.append("full accounting: 2 FLOPs per multiply-add, attention score/value products included, "
                     "the CFG batch (2 denoiser evaluations per step), image VAE excluded")
    if result["vae_decode"] is not None:
        notes.append(f"image VAE decode of the {frames} frames: {result['vae_decode']:.4g} TFLOPs, reported apart "
                     f"and not in either total (the paper leaves it out)")
    table = result["paper"]
    if table is None:
        notes.append(f"no Table 9 comparison: it covers {PAPER_CONFIG}, {PAPER_FRAMES} frames, "
                     f"{' or '.join(map(str, PAPER_TABLE9))} steps of both denoisers")
        return notes
    paper = result if accounting == "paper" else summarize(costs, cfg, steps, "paper", frames, motion_steps)
    for key, ours in (("cmd", result["cmd"]["total"]), ("baseline", result["baseline"]["total"])):
        label = "CMD" if key == "cmd" else BASELINE_NAME
        diff = ours / table[key] - 1
        line = f"{label}: {ours:.4g} TFLOPs vs Table 9's {table[key]} ({diff:+.1%})"
        if abs(diff) <= 0.10:
            notes.append(line + ", within 10%")
        elif accounting == "full":
            same = paper[key]["total"]
            notes.append(line + f": full accounting counts 2 FLOPs per multiply-add (x2), the CFG batch (x2 on "
                         f"every denoiser evaluation) and the attention score/value products "
                         f"(+{_attention_total(result, key):.4g} TFLOPs with CFG); the same count in paper "
                         f"accounting gives {same:.4g} ({same / table[key] - 1:+.1%} from the table)")
        else:
            notes.append(line + _paper_gap(result, key))
    return notes


def _parts(key: str) -> List[str]:
    return list(STAGE_OF.values()) if key == "cmd" else ["baseline_unet3d"]


def _attention_total(result: dict, key: str) -> float:
    """Attention score/value products of every evaluation of one side, in the result's unit."""
    nets = result["networks"]
    return sum(nets[n]["attention_tflops_per_eval"] * nets[n]["evals"] for n in _parts(key))


def _paper_gap(result: dict, key: str) -> str:
    """Why a paper-accounting total is off the table by more than 10%: the parts of ours, and the attention
    products that fvcore would not have counted, so that the gap can be traced."""
    parts = ", ".join(f"{n} {result['networks'][n]['total']:.4g}" for n in _parts(key))
    return (f": beyond 10%; ours is made of {parts} T multiply-adds (attention products, left out as fvcore "
            f"did, would add {_attention_total(result, key):.4g}); the network sizes or the latent size differ "
            f"from the paper's")


# ------------------------------------------------------------------------------------------------ CLI


def _format_table(r: dict) -> str:
    unit = "T multiply-adds" if r["accounting"] == "paper" else "TFLOPs"
    frames, height, width = r["video"]
    lines = [f"FLOPs to sample one {frames}x{height}x{width} video: {r['config']}, {r['steps']} steps, "
             f"{r['accounting']} accounting ({unit})",
             f"{'network':<26}{'params':>10}{'per eval':>12}{'evals':>7}{'total':>12}"]
    labels = {"content_unet": "content UNet", "motion_dit": "motion DiT", "ae_decoder": "AE decoder",
              "vae_decoder": "image VAE decode (apart)", "baseline_unet3d": "baseline UNet3D"}
    for name, label in labels.items():
        if name not in r["networks"]:
            continue
        n = r["networks"][name]
        lines.append(f"{label:<26}{n['params'] / 1e6:>9.1f}M{n['tflops_per_eval']:>12.4g}{n['evals']:>7}"
                     f"{n['total']:>12.4g}")
        if name == "ae_decoder":
            lines.append(f"{'CMD total':<55}{r['cmd']['total']:>12.4g}")
    lines.append(f"baseline / CMD: {r['ratio']:.3g}x")
    lines += [f"note: {note}" for note in r["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m engine.flops`` / ``python -m engine.bench flops``: ``argv`` is what follows ``flops``."""
    parser = Parser(prog="python -m engine.bench flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=PAPER_CONFIG, help="config name or JSON file (default: %(default)s)")
    parser.add_argument("--steps", type=Int(), default=50, help="sampling steps of both denoisers")
    parser.add_argument("--accounting", choices=ACCOUNTINGS, default="paper")
    parser.add_argument("--frames", type=Int(), default=None, help="frames per video (default: the config's)")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON, the last line of stdout")

    def body() -> int:
        args = parser.parse_args(argv)
        result = count_flops(args.config, steps=args.steps, accounting=args.accounting, frames=args.frames)
        print(_format_table(result))
        if args.json:
            print(json.dumps(result))
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
