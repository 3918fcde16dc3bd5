"""``onnxruntime``: the networks as ONNX Runtime sessions over the graphs of ``python -m export onnx``.

Graphs come from an export folder (:mod:`engine.networks` declares them; ``export/`` writes them):
``onnx_dir=`` (backend option), else ``$CMD_ONNX_DIR``, else the folder under ``<cache>/onnx`` built
from exactly this model's weights. A folder built from other weights is refused (the manifest holds
the weights' hash), so a stale export never runs silently.

On CPU tensors go through numpy; on CUDA (``onnxruntime-gpu``) inputs and outputs are bound in place
on the device (I/O binding), no host copies. Graph inputs are cast to the graph's precision and
timesteps to float32 as the declarations say; outputs come back in the graph's precision.

The text encoder and, in latent mode, the image VAE decoder run here too:
``backend.text_encoder()`` is a ``TextEncoder`` over the exported graph (the pipeline uses it), and
``backend.decode_frames(latents)`` is the VAE decode (:class:`engine.backends.graph.GraphBackend`).
"""

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from engine.artefacts import (EXPORT_AGAIN, ONNX_DIR_ENV, PRECISIONS, check_export_exists, check_files, check_weights,
                              graph_files,
                              load_tokenizer, locate_export, networks_from_manifest, read_manifest, weights_hash)
from engine.backends import register_backend
from engine.backends.graph import GraphBackend
from engine.backends.graph_weights import GraphWeights
from engine.models.text import TextEncoder
from engine.networks import Network

MISSING = "the onnxruntime backend needs the onnxruntime package (pip install onnxruntime; onnxruntime-gpu for CUDA)"
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ValueError(MISSING) from None
    return onnxruntime


def providers_for(device) -> List:
    """Execution providers for a torch device: CUDA (then CPU for the odd unsupported node) or CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        available = _ort().get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise ValueError(f"device {device} asked for, but this onnxruntime has no CUDA provider (it has "
                             f"{', '.join(available)}); pip install onnxruntime-gpu")
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtNetwork:
    """One exported network in an onnxruntime session, called with torch tensors in declaration order."""

    def __init__(self, onnx_dir: str, network: Network, entry: Dict, device="cpu",
                 providers: Optional[Sequence] = None, threads: Optional[int] = None,
                 overrides: Optional[Dict] = None):
        ort = _ort()
        self.network = network
        self.device = torch.device(device)
        self.precision = PRECISIONS[entry["precision"]]
        self.path = os.path.join(onnx_dir, entry["file"])
        if not os.path.isfile(self.path):
            raise ValueError(f"export folder {onnx_dir!r} lacks {entry['file']} (listed in its manifest)")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: ORT warns about every node it leaves to the CPU
        # Adapted weights (engine.backends.graph_weights): initializers overridden in this session only.
        self._override_values = [ort.OrtValue.ortvalue_from_numpy(v) for v in (overrides or {}).values()]
        for name, value in zip(overrides or {}, self._override_values):
            options.add_initializer(name, value)
        self.session = ort.InferenceSession(self.path, options, providers=list(providers or providers_for(device)))
        self.in_dtypes = {t.name: t.torch_dtype(self.precision) for t in network.inputs}
        self.out_dtypes = [t.torch_dtype(self.precision) for t in network.outputs]
        self.bind = self.device.type == "cuda" and "CUDAExecutionProvider" in self.session.get_providers()

    def __call__(self, *tensors: torch.Tensor) -> List[torch.Tensor]:
        names = self.network.input_names
        if len(tensors) != len(names):
            raise ValueError(f"{self.network.name} takes {len(names)} inputs ({', '.join(names)}), got {len(tensors)}")
        shapes = {n: tuple(t.shape) for n, t in zip(names, tensors)}
        bucket = self.network.find_bucket(shapes)  # a clear error for sizes the graphs were not built for
        if self.bind:
            return self._run_bound(tensors, bucket, shapes[names[0]][0])
        feeds = {n: t.detach().to("cpu", self.in_dtypes[n]).contiguous().numpy() for n, t in zip(names, tensors)}
        outs = self.session.run(self.network.output_names, feeds)
        return [torch.from_numpy(o).to(self.device) for o in outs]

    def _run_bound(self, tensors, bucket, batch: int) -> List[torch.Tensor]:
        """CUDA: bind torch's device memory as the session's inputs and outputs (no host round trip)."""
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        binding = self.session.io_binding()
        inputs = []
        for name, t in zip(self.network.input_names, tensors):
            t = t.detach().to(self.device, self.in_dtypes[name]).contiguous()
            inputs.append(t)  # keep alive until the run ends
            binding.bind_input(name, "cuda", index, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
        outputs = []
        for (name, shape), dtype in zip(self.network.output_shapes(bucket, batch).items(), self.out_dtypes):
            out = torch.empty(shape, dtype=dtype, device=self.device)
            binding.bind_output(name, "cuda", index, _NUMPY[dtype], shape, out.data_ptr())
            outputs.append(out)
        torch.cuda.current_stream(self.device).synchronize()  # torch wrote the inputs on its own stream
        self.session.run_with_iobinding(binding)  # returns once the outputs are written
        return outputs


@register_backend("onnxruntime")
class OnnxRuntimeBackend(GraphBackend):
    """Options: ``onnx_dir`` (an export folder), ``providers`` (onnxruntime providers; default from the
    device), ``threads`` (intra-op threads), ``verify_weights`` (check the manifest's weights hash)."""

    def __init__(self, model, device=None, dtype=None, onnx_dir: Optional[str] = None,
                 providers: Optional[Sequence] = None, threads: Optional[int] = None, verify_weights: bool = True):
        super().__init__(model, device, dtype)
        self.check_ready(self.device, self.dtype, onnx_dir, providers)
        digest = weights_hash(model) if verify_weights or not (onnx_dir or os.environ.get(ONNX_DIR_ENV)) else None
        folder = locate_export(model, self.dtype, onnx_dir, digest)
        self.manifest = read_manifest(folder)
        self.attach(folder, networks_from_manifest(self.manifest), "graphs")
        check_files(folder, graph_files(self.manifest), self.source, EXPORT_AGAIN)  # before any graph runs
        if verify_weights:
            check_weights(self.manifest["model"]["weights_sha256"], model, self.source, EXPORT_AGAIN, digest)
        self.providers = list(providers) if providers is not None else providers_for(self.device)
        self.graph_weights = GraphWeights()
        self.threads = threads
        self.check_required("export all networks: python -m export onnx --model MODEL --out DIR")

    @classmethod
    def check_ready(cls, device, dtype, onnx_dir: Optional[str] = None, providers: Optional[Sequence] = None,
                    **options) -> None:
        """onnxruntime importable (with a CUDA provider for a CUDA device) and ONNX graphs to run: the folder
        named (``onnx_dir`` or ``$CMD_ONNX_DIR``) is an export folder, or the cache holds exports
        (``engine.artefacts.check_export_exists``); which of them holds this model's weights is found when it
        has loaded."""
        _ort()
        if providers is None:
            providers_for(device)
        check_export_exists(onnx_dir)

    @property
    def onnx_dir(self) -> str:
        return self.folder

    def open(self, name: str) -> OrtNetwork:
        return OrtNetwork(self.folder, self.networks[name], self.manifest["networks"][name], self.device,
                          self.providers, self.threads, self.graph_weights.overrides.get(name))

    def update_weights(self, changed) -> None:
        """Adapters: the changed weights become overriding initializers of new sessions of the graphs they are
        in (opened on their next use); no export."""
        for graph in self.graph_weights.update(changed, self._onnx_path, self._precision):
            self._sessions.pop(graph, None)

    def _onnx_path(self, graph: str) -> Optional[str]:
        entry = self.manifest["networks"].get(graph)
        return os.path.join(self.folder, entry["file"]) if entry else None

    def _precision(self, graph: str):
        return PRECISIONS[self.manifest["networks"][graph]["precision"]]

    def text_encoder(self) -> Optional["OnnxTextEncoder"]:
        """The exported text encoder, or None where the export folder has none (the pipeline then keeps
        its PyTorch one)."""
        if "text_encoder" not in self.networks:
            return None
        return OnnxTextEncoder(self.folder, self.device, self.providers, self.threads)


class OnnxTextEncoder(TextEncoder):
    """The exported text encoder: a :class:`engine.models.TextEncoder` whose encoder is the graph (pooling
    included) and whose tokenizer is the one saved in the export folder, so it needs neither the model
    package nor the hub."""

    def __init__(self, onnx_dir: str, device="cpu", providers: Optional[Sequence] = None,
                 threads: Optional[int] = None):
        manifest = read_manifest(onnx_dir)
        networks = networks_from_manifest(manifest)
        if "text_encoder" not in networks:
            raise ValueError(f"export folder {onnx_dir!r} has no text_encoder graph; export it with the text encoder")
        check_files(onnx_dir, graph_files(manifest, ["text_encoder"]), f"the graphs in {onnx_dir!r}", EXPORT_AGAIN)
        info = manifest["text_encoder"]
        graph = OrtNetwork(onnx_dir, networks["text_encoder"], manifest["networks"]["text_encoder"], device,
                           providers, threads)
        super().__init__(load_tokenizer(onnx_dir, manifest), graph, int(info["max_length"]),
                         int(manifest["config"]["text_encoder"]["hidden_size"]), bool(info["normalize_pooled"]), device)
