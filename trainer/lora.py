"""Adapter (LoRA) training: peft LoRA layers injected into a frozen network, and the adapter file written
from them (the format of :mod:`engine.adapters`).

``python -m trainer.train --stage content|motion|autoencoder --init MODEL --lora RANK`` trains only the
injected ``lora_A`` / ``lora_B`` weights; the base network's weights stay as loaded (and the --init folder is
never written). The adapter (EMA of the LoRA weights) is written atomically to ``<out>/adapter.safetensors``
at every checkpoint and at the end.

Adapters of one concept trained per network (the content UNet's and the decoder's parts of cyan) become one
file with::

    python -m trainer.lora join --out cyan.safetensors runs/cyan-content/adapter.safetensors \
        runs/cyan-decoder/adapter.safetensors
"""

import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from engine.adapters import DEFAULT_TARGETS, NetworkLora, network_hash, save_adapter

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_NAME = "default"  # peft's adapter name inside the training network


@dataclass
class LoraSpec:
    """What to inject: rank, alpha (scaling alpha / rank) and peft ``target_modules`` (a list of module-name
    suffixes, or a regular expression matched against whole module names)."""

    rank: int
    alpha: float
    targets: Union[List[str], str]


def lora_spec(network: str, rank: int, alpha: Optional[float] = None, targets: Optional[str] = None) -> LoraSpec:
    """The spec of ``--lora RANK [--lora-alpha A] [--lora-targets T]`` for ``network``: alpha defaults to the
    rank (scaling 1); targets to :data:`engine.adapters.DEFAULT_TARGETS`; ``T`` is comma-separated suffixes
    or, when it starts with ``re:``, a regular expression. A ValueError naming a bad value."""
    if rank < 1:
        raise ValueError(f"--lora must be a rank of at least 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"--lora-alpha must be positive, got {alpha}")
    if targets is None:
        chosen: Union[List[str], str] = DEFAULT_TARGETS[network]
    elif targets.startswith("re:"):
        chosen = targets[3:]
        try:
            re.compile(chosen)
        except re.error as e:
            raise ValueError(f"--lora-targets {targets!r}: not a regular expression ({e})") from None
    else:
        chosen = [t.strip() for t in targets.split(",") if t.strip()]
        if not chosen:
            raise ValueError(f"--lora-targets must name at least one module, got {targets!r}")
    return LoraSpec(rank, alpha, chosen)


def inject_lora(net: nn.Module, spec: LoraSpec) -> List[str]:
    """Inject peft LoRA layers into ``net`` in place (B initialised to zero, so the network computes what it
    did); only they are trainable afterwards. Returns the adapted module names. A ValueError when a target
    matches no linear layer."""
    from peft import LoraConfig, inject_adapter_in_model

    linear = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(spec.targets, str):
        matched = [n for n in linear if re.fullmatch(spec.targets, n)]
    else:
        matched = [n for n in linear if any(n == t or n.endswith("." + t) for t in spec.targets)]
    if not matched:
        raise ValueError(f"--lora-targets {spec.targets!r} matches no linear layer of the {type(net).__name__}")
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=matched, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, net, adapter_name=ADAPTER_NAME)
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    return matched


def lora_layers(net: nn.Module) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (A, B) of the LoRA layers in ``net`` (peft's state dict, keys without the adapter name:
    ``<module>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(net, adapter_name=ADAPTER_NAME)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    return {m: (state[f"{m}.lora_A.weight"].float(), state[f"{m}.lora_B.weight"].float()) for m in modules}


def write_adapter(path: str, network: str, net: nn.Module, spec: LoraSpec, base_hash: str, data: str,
                  steps: int) -> int:
    """Write ``net``'s LoRA layers as an adapter file for ``network`` (atomically); returns its size in bytes."""
    part = NetworkLora(network, spec.rank, spec.alpha, spec.targets, base_hash, lora_layers(net))
    return save_adapter(path, [part], data=data, steps=steps)


def prepare_lora(net: nn.Module, spec: LoraSpec) -> str:
    """The base network's weight hash (before injection), then the injection: what a LoRA run does first."""
    base_hash = network_hash(net)
    inject_lora(net, spec)
    return base_hash


def adapter_path(out: str) -> str:
    return os.path.join(out, ADAPTER_FILE)


def main(argv: Optional[List[str]] = None) -> int:
    from engine.adapters import join_adapters, scale_adapter
    from engine.cli import Number, Parser, run_main

    def body():
        p = Parser(prog="python -m trainer.lora",
                   description="Join adapter files (one per network) into one, or bake a weight into an adapter.")
        p.add_argument("command", choices=["join", "scale"],
                       help="join: the inputs' networks in one file; scale: the one input's alphas times --factor")
        p.add_argument("inputs", nargs="+", help="adapter files (join: each adapting other networks; scale: one)")
        p.add_argument("--out", required=True, help="the adapter file to write (atomically)")
        p.add_argument("--factor", type=Number(above=0),
                       help="scale: weight 1 of --out applies what weight FACTOR of the input did")
        args = p.parse_args(argv)
        if args.command == "scale" and (len(args.inputs) != 1 or args.factor is None):
            p.error("scale takes one adapter file and --factor")
        if args.command == "join" and args.factor is not None:
            p.error("--factor belongs to scale, not join")
        made = (join_adapters(args.inputs, args.out) if args.command == "join"
                else scale_adapter(args.inputs[0], args.factor, args.out))
        print(f"adapter: {args.out} ({', '.join(made.networks)}; {os.path.getsize(args.out) / 1024:.1f} KiB"
              f"{'; ' + made.scaled if made.scaled else ''})")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
