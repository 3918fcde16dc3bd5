"""``onnxruntime``: the networks as ONNX Runtime sessions over the graphs of ``python -m export onnx``.

Graphs come from an export folder (:mod:`engine.networks` declares them; ``export/`` writes them):
``onnx_dir=`` (backend option), else ``$CMD_ONNX_DIR``, else the folder under ``<cache>/onnx`` built
from exactly this model's weights. A folder built from other weights is refused (the manifest holds
the weights' hash), so a stale export never runs silently.

On CPU tensors go through numpy; on CUDA (``onnxruntime-gpu``) inputs and outputs are bound in place
on the device (I/O binding), no host copies. Graph inputs are cast to the graph's precision and
timesteps to float32 as the declarations say; outputs come back in the graph's precision.

The text encoder and, in latent mode, the image VAE decoder run here too:
``backend.text_encoder()`` has the ``TextEncoder`` interface (pass it to ``CMDPipeline``), and
``backend.decode_frames(latents)`` is the VAE decode.
"""

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from engine.backends import register_backend
from engine.backends.base import Backend
from engine.artefacts import (EXPORT_AGAIN, ONNX_DIR_ENV, PRECISIONS, check_weights, load_tokenizer, locate_export,
                              networks_from_manifest, read_manifest, weights_hash)
from engine.networks import VAE_CHUNK, Network, check_calls

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
                 providers: Optional[Sequence] = None, threads: Optional[int] = None):
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
class OnnxRuntimeBackend(Backend):
    """Options: ``onnx_dir`` (an export folder), ``providers`` (onnxruntime providers; default from the
    device), ``threads`` (intra-op threads), ``verify_weights`` (check the manifest's weights hash)."""

    def __init__(self, model, device=None, dtype=None, onnx_dir: Optional[str] = None,
                 providers: Optional[Sequence] = None, threads: Optional[int] = None, verify_weights: bool = True):
        super().__init__(model, device, dtype)
        digest = weights_hash(model) if verify_weights or not (onnx_dir or os.environ.get(ONNX_DIR_ENV)) else None
        self.onnx_dir = locate_export(model, self.dtype, onnx_dir, digest)
        self.manifest = read_manifest(self.onnx_dir)
        if verify_weights:
            check_weights(self.manifest["model"]["weights_sha256"], model, f"the graphs in {self.onnx_dir!r}",
                          EXPORT_AGAIN, digest)
        self.providers = list(providers) if providers is not None else providers_for(self.device)
        self.threads = threads
        self.networks = networks_from_manifest(self.manifest)
        needed = ["content_unet", "motion_dit", "ae_decoder"]
        missing = [n for n in needed if n not in self.networks]
        if missing:
            raise ValueError(f"export folder {self.onnx_dir!r} lacks the {', '.join(missing)} graph(s); export "
                             "all networks: python -m export onnx --model MODEL --out DIR")
        self.reset()

    def reset(self) -> None:
        self._sessions: Dict[str, OrtNetwork] = {}

    def check_calls(self, calls) -> None:
        """The graphs' shape buckets and batch ranges (from the manifest), before any session runs."""
        check_calls(self.networks, calls, f"the graphs in {self.onnx_dir!r}")

    def session(self, name: str) -> OrtNetwork:
        """The session of one network, opened on first use."""
        if name not in self._sessions:
            if name not in self.networks:
                raise ValueError(f"export folder {self.onnx_dir!r} has no {name} graph")
            self._sessions[name] = OrtNetwork(self.onnx_dir, self.networks[name], self.manifest["networks"][name],
                                              self.device, self.providers, self.threads)
        return self._sessions[name]

    def unet_step(self, sample, timestep, states):
        return self.session("content_unet")(sample, timestep, states)[0]

    def dit_step(self, motion, timestep, content, text):
        return self.session("motion_dit")(motion, timestep, content, text)[0]

    def decode(self, content, motion):
        return self.session("ae_decoder")(content, motion)[0]

    def decode_frames(self, latents: torch.Tensor, chunk: int = VAE_CHUNK) -> torch.Tensor:
        """Latent mode: scaled latents (B, L, c, h, w) -> RGB (B, L, 3, H, W) in [-1, 1], ``chunk``
        frames per call, as ``engine.models.vae.decode_frames``."""
        b, frames = latents.shape[:2]
        flat = latents.reshape(b * frames, *latents.shape[2:])
        video = torch.cat([self.session("vae_decoder")(part)[0] for part in flat.split(chunk)])
        return video.reshape(b, frames, *video.shape[1:])

    def text_encoder(self) -> Optional["OnnxTextEncoder"]:
        """The exported text encoder, or None where the export folder has none (the pipeline then keeps
        its PyTorch one)."""
        if "text_encoder" not in read_manifest(self.onnx_dir).get("networks", {}):
            return None
        return OnnxTextEncoder(self.onnx_dir, self.device, self.providers, self.threads)


class OnnxTextEncoder:
    """The exported text encoder with the ``TextEncoder`` interface: ``enc(prompts) -> (states (B, T, d),
    pooled (B, d))`` float32, ``.hidden_size``, ``.max_length``, ``.to(device)``. Its tokenizer is the
    one saved in the export folder, so it needs neither the model package nor the hub."""

    def __init__(self, onnx_dir: str, device="cpu", providers: Optional[Sequence] = None,
                 threads: Optional[int] = None):
        manifest = read_manifest(onnx_dir)
        networks = networks_from_manifest(manifest)
        if "text_encoder" not in networks:
            raise ValueError(f"export folder {onnx_dir!r} has no text_encoder graph; export it with the text encoder")
        self.tokenizer = load_tokenizer(onnx_dir, manifest)
        self.max_length = int(manifest["text_encoder"]["max_length"])
        self.hidden_size = int(manifest["config"]["text_encoder"]["hidden_size"])
        self._device = torch.device(device)
        self._network = OrtNetwork(onnx_dir, networks["text_encoder"], manifest["networks"]["text_encoder"],
                                   self._device, providers, threads)

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device) -> "OnnxTextEncoder":
        self._device = torch.device(device)
        return self

    def tokenize(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self.tokenizer, "save_pretrained"):  # Hugging Face
            batch = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                                   return_tensors="pt")
            return batch["input_ids"], batch["attention_mask"]
        return self.tokenizer(list(prompts), self.max_length)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids, mask = self.tokenize(prompts)
        states, pooled = self._network(ids, mask)
        return states.float().to(self._device), pooled.float().to(self._device)
