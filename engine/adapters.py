"""Low-rank adapters (LoRA) for the CMD networks: the file format, its checks, and switching at run time.

An adapter file is safetensors. Its tensors follow the peft/diffusers LoRA convention: for a linear layer
``<module>`` of a network, ``<prefix>.<module>.lora_A.weight`` (rank, in) and ``<prefix>.<module>.lora_B.weight``
(out, rank), the prefix naming the network as diffusers does (``unet`` for the content UNet, ``transformer``
for the motion DiT; ``autoencoder`` for the AE, which diffusers has no name for). One file may hold adapters
for several networks. Its metadata (strings) holds ``format`` = "cmd-lora", ``format_version``, ``networks``
(JSON: per network its prefix, rank, alpha, target modules and the SHA-256 of the base network's weights,
:func:`network_hash`), ``data`` and ``steps``.

Switching is done on the weights, not the graph: every adapted linear layer's weight is rewritten in place as
``W = W_base + sum_i weight_i * (alpha_i / rank_i) * B_i @ A_i`` (computed in float32, then cast), and put back
to the saved ``W_base`` bytes when no adapter is active. So no module changes (a compiled graph sees the same
parameters, a captured CUDA graph the same storage), and a base model without adapters, with every adapter at
weight 0, or after unloading, computes exactly what it computed before. Backends that hold their own copy of
the weights (ONNX Runtime, TensorRT) are told which weights changed (:meth:`engine.backends.Backend.update_weights`).

Training (``python -m trainer.train --lora RANK``) injects peft LoRA layers into the frozen network and writes
this format with :func:`save_adapter`.
"""

import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

FORMAT = "cmd-lora"
FORMAT_VERSION = "1"
ADAPTERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "adapters")

# The key prefix of each network (diffusers' names where it has one).
PREFIX = {"content_unet": "unet", "motion_dit": "transformer", "autoencoder": "autoencoder"}
NETWORK_OF_PREFIX = {v: k for k, v in PREFIX.items()}

# Default target modules per network (peft ``target_modules``): the attention projections and the
# feed-forward layers; for the motion DiT also the adaLN modulation and the text projection (the text
# reaches the DiT only through them); for the AE the decoder side alone (the encoder's content frames and
# motion latents are what the content UNet and motion DiT were trained on).
DEFAULT_TARGETS: Dict[str, Union[List[str], str]] = {
    "content_unet": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
    "motion_dit": ["qkv", "proj", "mlp.0", "mlp.2", "adaLN_modulation.1", "text_proj"],
    "autoencoder": r"(decoder_blocks\.\d+\.(attn_time|attn_space)\.(qkv|proj)|decoder_blocks\.\d+\.ff\.(fc_in|fc_out)"
                   r"|content_embed|motion_embed_height|motion_embed_width|output_head)",
}


class AdapterError(ValueError):
    """A file that is not an adapter, or an adapter that does not fit the model (a one-line message)."""


# ---------------------------------------------------------------------------------------------- format


@dataclass
class NetworkLora:
    """One network's part of an adapter: ``layers`` maps a module name (as in ``net.named_modules()``) to
    its (A (rank, in), B (out, rank)) float tensors."""

    network: str
    rank: int
    alpha: float
    targets: Union[List[str], str]
    base_hash: str
    layers: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class Adapter:
    """An adapter file's content: per network its layers, and what it was trained on."""

    networks: Dict[str, NetworkLora]
    data: str = ""
    steps: str = ""  # training steps ("300"; a joined file: per part, "content_unet:300,autoencoder:300")
    path: str = ""
    scaled: str = ""  # alphas changed after training (scale_adapter): "x1.5 (content_unet alpha 8 -> 12)"

    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for part in self.networks.values() for a, b in part.layers.values())


def network_hash(net: nn.Module) -> str:
    """SHA-256 (hex) of a network's weights as float32: names, shapes and values of its state dict in name
    order. What an adapter records of the base it was trained on. A model cast to another dtype keeps the hash
    it had when loaded (:func:`remember_base_hashes`)."""
    cached = getattr(net, "_cmd_base_hash", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def remember_base_hashes(model: nn.Module) -> None:
    """Compute and keep every network's :func:`network_hash` now (call before casting a model to a lower
    precision, which would change the hash)."""
    for name in PREFIX:
        net = getattr(model, name, None)
        if net is not None and getattr(net, "_cmd_base_hash", None) is None:
            net._cmd_base_hash = network_hash(net)


def save_adapter(path: str, parts: Sequence[NetworkLora], data: str = "", steps: Union[int, str] = 0,
                 scaled: str = "") -> int:
    """Write an adapter file atomically (a temporary file renamed over ``path``); returns its size in bytes.
    ``parts``: the networks' layers (float tensors, stored in their own dtype). ``scaled``: how the alphas
    were changed after training (:func:`scale_adapter`), kept in the metadata."""
    from safetensors.torch import save_file

    from engine.atomic import atomic_path

    tensors: Dict[str, torch.Tensor] = {}
    networks = {}
    for part in parts:
        prefix = PREFIX[part.network]
        for module, (a, b) in sorted(part.layers.items()):
            tensors[f"{prefix}.{module}.lora_A.weight"] = a.detach().to("cpu").clone()
            tensors[f"{prefix}.{module}.lora_B.weight"] = b.detach().to("cpu").clone()
        networks[part.network] = {"prefix": prefix, "rank": part.rank, "alpha": part.alpha,
                                  "target_modules": part.targets, "base_hash": part.base_hash}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "networks": json.dumps(networks),
                "data": str(data), "steps": str(steps), **({"scaled": scaled} if scaled else {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return os.path.getsize(path)


def read_adapter(path: str) -> Adapter:
    """Read and check an adapter file (no pickle: safetensors only). Raises :class:`AdapterError` naming the
    file and what is wrong: missing, not safetensors, not an adapter (no "cmd-lora" metadata), a key outside
    the convention, a layer without its A or B, or ranks that disagree with the metadata."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise AdapterError(f"adapter {path!r}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a file of another format
        raise AdapterError(f"adapter {path!r} is not a safetensors file ({type(e).__name__})") from None
    if metadata.get("format") != FORMAT:
        raise AdapterError(f"{path!r} is not a CMD adapter (its metadata has no format={FORMAT!r})")
    try:
        networks = json.loads(metadata["networks"])
        parts = {name: NetworkLora(name, int(m["rank"]), float(m["alpha"]), m["target_modules"], str(m["base_hash"]))
                 for name, m in networks.items()}
    except (KeyError, ValueError, TypeError) as e:
        raise AdapterError(f"adapter {path!r}: unreadable 'networks' metadata ({e})") from None
    _fill_layers(path, parts, tensors)
    return Adapter(parts, metadata.get("data", ""), metadata.get("steps", ""), path, metadata.get("scaled", ""))


def join_adapters(paths: Sequence[str], out: str) -> Adapter:
    """One adapter file ``out`` from the files ``paths``, each adapting other networks (e.g. the content UNet's
    and the decoder's parts of one concept); ``data`` and ``steps`` list every part's. A one-line AdapterError
    when two files adapt the same network. Returns the joined adapter."""
    adapters = [read_adapter(p) for p in paths]
    parts: Dict[str, NetworkLora] = {}
    for adapter in adapters:
        for network, part in adapter.networks.items():
            if network in parts:
                raise AdapterError(f"{adapter.path!r} and another file both adapt the {network}")
            parts[network] = part
    data = ";".join(a.data for a in adapters)
    steps = ",".join(f"{'+'.join(a.networks)}:{a.steps}" for a in adapters)
    scaled = "; ".join(a.scaled for a in adapters if a.scaled)
    save_adapter(out, list(parts.values()), data=data, steps=steps, scaled=scaled)
    return read_adapter(out)


def scale_adapter(path: str, factor: float, out: str) -> Adapter:
    """``out``: the adapter ``path`` with every network's alpha times ``factor``, so that weight 1 applies
    what weight ``factor`` applied before (LoRA's delta is alpha / rank * B @ A); the layers are unchanged and
    the metadata's ``scaled`` records the change. A one-line AdapterError for a factor that is not finite and
    positive. Returns the new adapter."""
    import math

    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise AdapterError(f"scale factor must be a finite number > 0, got {factor!r}")
    adapter = read_adapter(path)
    changes = []
    for part in adapter.networks.values():
        changes.append(f"{part.network} alpha {part.alpha:g} -> {part.alpha * factor:g}")
        part.alpha *= factor
    scaled = "; ".join(filter(None, [adapter.scaled, f"x{factor:g} ({', '.join(changes)})"]))
    save_adapter(out, list(adapter.networks.values()), data=adapter.data, steps=adapter.steps, scaled=scaled)
    return read_adapter(out)


_KEY = re.compile(r"^(?P<prefix>[A-Za-z_]+)\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def _fill_layers(path: str, parts: Dict[str, NetworkLora], tensors: Mapping[str, torch.Tensor]) -> None:
    pairs: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None or m["prefix"] not in NETWORK_OF_PREFIX:
            raise AdapterError(f"adapter {path!r}: key {key!r} is not '<unet|transformer|autoencoder>.<module>"
                               ".lora_A|lora_B.weight'")
        network = NETWORK_OF_PREFIX[m["prefix"]]
        if network not in parts:
            raise AdapterError(f"adapter {path!r}: key {key!r} is for the {network}, which its metadata does not list")
        pairs.setdefault((network, m["module"]), {})[m["ab"]] = tensor
    for (network, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise AdapterError(f"adapter {path!r}: {PREFIX[network]}.{module} has no lora_{missing}.weight")
        a, b = ab["A"], ab["B"]
        rank = parts[network].rank
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"adapter {path!r}: {PREFIX[network]}.{module} has lora_A {tuple(a.shape)} and lora_B "
                               f"{tuple(b.shape)}, not (rank, in) and (out, rank) with rank {rank}")
        parts[network].layers[module] = (a, b)


def check_adapter(adapter: Adapter, model: nn.Module) -> None:
    """Raise :class:`AdapterError` (one line) when ``adapter`` does not fit ``model``: a network the model does
    not have, another base network (the weight hashes differ), or the first layer that is missing, not a
    linear layer, or of another shape."""
    for network, part in adapter.networks.items():
        net = getattr(model, network, None)
        if net is None:
            raise AdapterError(f"adapter {adapter.path!r} is for the {network}, which this model does not have")
        have = network_hash(net)
        if have != part.base_hash:
            raise AdapterError(f"adapter {adapter.path!r} was trained on another {network} (base weight hash "
                               f"{part.base_hash[:12]}, this model's {have[:12]})")
        modules = dict(net.named_modules())
        for module, (a, b) in sorted(part.layers.items()):
            layer = modules.get(module)
            if not isinstance(layer, nn.Linear):
                what = "no such layer" if layer is None else f"a {type(layer).__name__}, not a Linear"
                raise AdapterError(f"adapter {adapter.path!r}: {PREFIX[network]}.{module}: {what} in this {network}")
            if (b.shape[0], a.shape[1]) != tuple(layer.weight.shape):
                raise AdapterError(f"adapter {adapter.path!r}: {PREFIX[network]}.{module} adapts a "
                                   f"{b.shape[0]}x{a.shape[1]} weight, this {network}'s is "
                                   f"{layer.weight.shape[0]}x{layer.weight.shape[1]}")


# ---------------------------------------------------------------------------------------------- names


def parse_lora_spec(spec: str) -> Tuple[str, float]:
    """``NAME_OR_PATH[:SCALE]`` -> (name or path, scale); a ValueError naming a bad scale."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head:
        return spec, 1.0
    try:
        return head, float(tail)
    except ValueError:
        if os.path.exists(spec):  # a path with a colon in it
            return spec, 1.0
        raise ValueError(f"--lora {spec!r}: the scale after ':' must be a number, got {tail!r}") from None


def shipped_adapters() -> List[str]:
    """Names of the adapters shipped in ``engine/weights/adapters/``."""
    if not os.path.isdir(ADAPTERS_DIR):
        return []
    return sorted(f[: -len(".safetensors")] for f in os.listdir(ADAPTERS_DIR) if f.endswith(".safetensors"))


def resolve_adapter(name_or_path: str) -> str:
    """A path to an adapter file: ``name_or_path`` itself when it is a file, else the shipped adapter of that
    name. A ValueError naming it and the shipped names otherwise."""
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = os.path.join(ADAPTERS_DIR, f"{name_or_path}.safetensors")
    if os.path.sep not in name_or_path and os.path.isfile(shipped):
        return shipped
    raise AdapterError(f"adapter {name_or_path!r}: no such file, and no shipped adapter of that name "
                       f"(shipped: {', '.join(shipped_adapters()) or 'none'})")


def adapter_name_of(path: str) -> str:
    base = os.path.basename(path)
    return base[: -len(".safetensors")] if base.endswith(".safetensors") else base


# ---------------------------------------------------------------------------------------------- switching


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B @ A`` in float32: the weight change of one adapted linear layer (out, in)."""
    return (b.float() @ a.float()) * scaling


class AdapterSet:
    """The adapters loaded into one model and how they are mixed; writes the mix into the model's weights.

    ``loaded``: adapter name -> :class:`Adapter`; ``active``: name -> weight (``set_adapters``); ``fused``:
    the weight change baked in by ``fuse_lora`` (kept by ``unload``, removed by ``unfuse``); ``base``: the
    original bytes of every weight ever adapted, so that the base is restored exactly."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.loaded: Dict[str, Adapter] = {}
        self.active: Dict[str, float] = {}
        self.fused: Dict[Tuple[str, str], torch.Tensor] = {}
        self.fused_active: Dict[str, float] = {}
        self.base: Dict[Tuple[str, str], torch.Tensor] = {}
        remember_base_hashes(model)  # before any adapter changes a weight

    def load(self, adapter: Adapter, name: str) -> None:
        if name in self.loaded:
            raise AdapterError(f"an adapter named {name!r} is loaded already (adapter_name=...)")
        check_adapter(adapter, self.model)
        self.loaded[name] = adapter
        self.active[name] = 1.0

    def set_active(self, names: Sequence[str], weights: Sequence[float]) -> None:
        unknown = [n for n in names if n not in self.loaded]
        if unknown:
            raise AdapterError(f"adapter {unknown[0]!r} is not loaded (loaded: {', '.join(self.loaded) or 'none'})")
        self.active = dict(zip(names, (float(w) for w in weights)))

    def _mix(self, weights: Mapping[str, float]) -> Dict[Tuple[str, str], torch.Tensor]:
        """(network, module) -> the summed float32 weight change of the adapters at ``weights``."""
        out: Dict[Tuple[str, str], torch.Tensor] = {}
        for name, w in weights.items():
            if w == 0.0:
                continue
            for network, part in self.loaded[name].networks.items():
                for module, (a, b) in part.layers.items():
                    d = lora_delta(a, b, part.scaling * w)
                    key = (network, module)
                    out[key] = out[key] + d if key in out else d
        return out

    def fuse(self, scale: float) -> None:
        """Bake the active mix (times ``scale``) into the weights; the active set becomes empty."""
        for key, d in self._mix(self.active).items():
            d = d * scale
            self.fused[key] = self.fused[key] + d if key in self.fused else d
        self.fused_active, self.active = dict(self.active), {}

    def unfuse(self) -> None:
        """Remove what ``fuse`` baked in; the adapters it fused (those still loaded) are active again."""
        self.fused = {}
        self.active = {n: w for n, w in self.fused_active.items() if n in self.loaded}
        self.fused_active = {}

    def unload(self, names: Optional[Iterable[str]] = None) -> None:
        for name in list(self.loaded if names is None else names):
            self.loaded.pop(name, None)
            self.active.pop(name, None)

    @torch.no_grad()
    def apply(self) -> Dict[str, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
        """Write ``base + fused + active mix`` into every adapted weight, in place (same storage); the weights
        no longer adapted get their base bytes back. Returns network -> parameter name (``<module>.weight``)
        -> (its base value, the parameter), for backends that hold their own copy of the weights."""
        mix = self._mix(self.active)
        changed: Dict[str, Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = {}
        for key in sorted(set(mix) | set(self.fused) | set(self.base)):
            network, module = key
            weight = self.model.get_submodule(network).get_submodule(module).weight
            if key not in self.base:
                self.base[key] = weight.detach().clone()
            delta = None
            for part in (mix.get(key), self.fused.get(key)):
                if part is not None:
                    delta = part if delta is None else delta + part
            base = self.base[key]
            if delta is None:
                weight.copy_(base)
                del self.base[key]  # back to the base bytes: nothing to restore any more
            else:
                weight.copy_(base.float() + delta.to(base.device))  # copy_ casts to the weight's dtype
            changed.setdefault(network, {})[f"{module}.weight"] = (base, weight)
        return changed

    def adapted(self) -> Dict[str, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
        """Every weight that differs from its base now, as :meth:`apply` reports them (for a new backend)."""
        out: Dict[str, Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = {}
        for (network, module), base in self.base.items():
            weight = self.model.get_submodule(network).get_submodule(module).weight
            out.setdefault(network, {})[f"{module}.weight"] = (base, weight)
        return out

    @contextmanager
    def base_weights(self):
        """The base weights (plus nothing) in the model for the duration (a backend that checks or copies the
        weights is made in it), then the adapters' again."""
        if not self.base:
            yield
            return
        saved = {key: self.model.get_submodule(key[0]).get_submodule(key[1]).weight.detach().clone()
                 for key in self.base}
        try:
            with torch.no_grad():
                for key, base in self.base.items():
                    self.model.get_submodule(key[0]).get_submodule(key[1]).weight.copy_(base)
            yield
        finally:
            with torch.no_grad():
                for key, value in saved.items():
                    self.model.get_submodule(key[0]).get_submodule(key[1]).weight.copy_(value)


# ---------------------------------------------------------------------------------------------- pipeline API


class LoraMixin:
    """The diffusers-style adapter methods of :class:`engine.pipeline.CMDPipeline` (``self.model``: the
    CMDModel; ``self.backend``: its backend, told which weights changed)."""

    @property
    def adapters(self) -> AdapterSet:
        if getattr(self, "_adapters", None) is None:
            self._adapters = AdapterSet(self.model)
        return self._adapters

    def _make_backend(self, make):
        """``make()``'s backend, made while the model holds its base weights (a backend may check their hash or
        copy them), then told of the adapted ones."""
        adapters = getattr(self, "_adapters", None)
        if adapters is None:
            return make()
        with adapters.base_weights():
            backend = make()
        backend.update_weights(adapters.adapted())
        return backend

    def _apply_adapters(self) -> None:
        changed = self.adapters.apply()
        if changed:
            self.backend.update_weights(changed)

    def load_lora_weights(self, path_or_name: str, adapter_name: Optional[str] = None) -> str:
        """Load an adapter file (a path, or the name of a shipped adapter) and activate it at weight 1; returns
        its adapter name (default: the file name without ``.safetensors``). Every check (the file, the base
        weight hash per network, each layer's name and shape) runs before any weight changes: an
        :class:`AdapterError` (a ValueError) of one line otherwise."""
        adapter = read_adapter(resolve_adapter(path_or_name))
        name = adapter_name or adapter_name_of(adapter.path)
        self.adapters.load(adapter, name)
        self._apply_adapters()
        return name

    def set_adapters(self, adapter_names: Union[str, Sequence[str]],
                     adapter_weights: Union[None, float, Sequence[float]] = None) -> None:
        """Make ``adapter_names`` the active adapters (others stay loaded, inactive) at ``adapter_weights``
        (one per name, or one for all; default 1.0). Weight 0 is the base model exactly."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            adapter_weights = 1.0
        weights = [float(adapter_weights)] * len(names) if isinstance(adapter_weights, (int, float)) \
            else list(adapter_weights)
        if len(weights) != len(names):
            raise ValueError(f"adapter_weights has {len(weights)} values for {len(names)} adapters")
        self.adapters.set_active(names, weights)
        self._apply_adapters()

    def get_active_adapters(self) -> List[str]:
        return list(self.adapters.active)

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        """Bake the active adapters (times ``lora_scale``) into the weights: they stay after
        :meth:`unload_lora_weights` (to save a merged model) until :meth:`unfuse_lora`."""
        self.adapters.fuse(float(lora_scale))
        self._apply_adapters()

    def unfuse_lora(self) -> None:
        """Undo :meth:`fuse_lora`; the adapters it fused that are still loaded become active again."""
        self.adapters.unfuse()
        self._apply_adapters()

    def unload_lora_weights(self) -> None:
        """Remove every loaded adapter: the weights are the base model's again, byte for byte (plus what
        :meth:`fuse_lora` baked in, if anything)."""
        self.adapters.unload()
        self._apply_adapters()


# ---------------------------------------------------------------------------------------------- CLI


def check_lora_args(specs: Sequence[str]) -> List[Tuple[Adapter, str, float]]:
    """Read and check every ``--lora`` value before any model weights load: (adapter, its name, weight). A
    one-line ValueError for a bad scale, a missing or non-adapter file, or a name given twice."""
    out, names = [], set()
    for spec in specs:
        path, scale = parse_lora_spec(spec)
        adapter = read_adapter(resolve_adapter(path))
        name = adapter_name_of(adapter.path)
        if name in names:
            raise AdapterError(f"--lora {spec!r}: adapter {name!r} is given twice")
        names.add(name)
        out.append((adapter, name, scale))
    return out


def load_lora_args(pipe, adapters: Sequence[Tuple[Adapter, str, float]]) -> None:
    """Load :func:`check_lora_args`' adapters into ``pipe`` (each checked against the model first) and make
    them active at their weights; nothing changes when one does not fit."""
    if not adapters:
        return
    for adapter, _, _ in adapters:  # every check before any weight changes
        check_adapter(adapter, pipe.model)
    for adapter, name, _ in adapters:
        pipe.adapters.load(adapter, name)
    pipe.set_adapters([name for _, name, _ in adapters], [scale for _, _, scale in adapters])
