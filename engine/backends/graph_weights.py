"""Adapted weights for the backends that run exported graphs (onnxruntime, TensorRT).

An exported graph holds its own copy of the weights as ONNX initializers, named by the exporter and possibly
transposed by its optimizer (a linear layer's ``W`` may be stored as ``W.T`` for a MatMul). So a parameter is
found by value, not by name: the initializer whose bytes equal the parameter's base value (or its transpose)
in the graph's precision. An adapter switch then gives each graph the new values of its changed initializers:
onnxruntime as overriding initializers of a new session (``SessionOptions.add_initializer``, no re-export),
TensorRT through ``trt.Refitter`` (no rebuild). :class:`GraphWeights` keeps, per graph, the overrides in force.
"""

import hashlib
from typing import Dict, Optional, Tuple

import numpy as np
import torch

# The graph that runs each network's weights during generation (the AE's encoder side is not in a graph).
GRAPH_OF = {"content_unet": "content_unet", "motion_dit": "motion_dit", "autoencoder": "ae_decoder"}


def _digest(array: np.ndarray) -> Tuple[str, Tuple[int, ...], str]:
    array = np.ascontiguousarray(array)
    return hashlib.sha1(array.tobytes()).hexdigest(), tuple(array.shape), str(array.dtype)


def _numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    if dtype == torch.bfloat16:
        raise ValueError("adapters on bfloat16 graphs are not supported (numpy has no bfloat16): export in "
                         "float32 or float16")
    return t.detach().to("cpu", dtype).contiguous().numpy()


class InitializerIndex:
    """One ONNX file's initializers by value: :meth:`find` gives (name, transposed) of a weight."""

    def __init__(self, onnx_path: str):
        import onnx
        from onnx import numpy_helper

        model = onnx.load(onnx_path)  # external data beside it included
        self.path = onnx_path
        self.by_value: Dict[Tuple, list] = {}
        for init in model.graph.initializer:
            self.by_value.setdefault(_digest(numpy_helper.to_array(init)), []).append(init.name)

    def find(self, base: np.ndarray) -> Optional[Tuple[str, bool]]:
        """(initializer name, stored transposed) of the weight whose value is ``base`` (2-D); None when the
        graph holds no such initializer. A ValueError when several initializers hold that value (the override
        would be ambiguous)."""
        for transposed, value in ((False, base), (True, base.T)):
            names = self.by_value.get(_digest(value), [])
            if len(names) > 1:
                raise ValueError(f"{self.path!r}: initializers {names[:2]} both hold one adapted weight's value; "
                                 "fuse the adapter and export again (python -m export onnx)")
            if names:
                return names[0], transposed
        return None


class GraphWeights:
    """The overriding initializer values of each graph of an export folder (graph name -> name -> array)."""

    def __init__(self):
        self.indexes: Dict[str, InitializerIndex] = {}
        self.overrides: Dict[str, Dict[str, np.ndarray]] = {}
        self.located: Dict[Tuple[str, str], Optional[Tuple[str, bool]]] = {}  # (graph, param) -> where

    def update(self, changed, onnx_path_of, dtype_of) -> Dict[str, Dict[str, np.ndarray]]:
        """Record ``changed`` (:meth:`engine.adapters.AdapterSet.apply`'s network -> param -> (base, now)) for
        the graphs that exist (``onnx_path_of(graph)``: its ONNX file, or None); ``dtype_of(graph)``: its
        precision. Returns graph -> the initializers whose values changed now (name -> array). A ValueError
        when a changed weight of the content UNet or motion DiT is not found in its graph."""
        updates: Dict[str, Dict[str, np.ndarray]] = {}
        for network, params in changed.items():
            graph = GRAPH_OF.get(network)
            path = onnx_path_of(graph) if graph else None
            if path is None:
                continue
            dtype = dtype_of(graph)
            for param, (base, now) in params.items():
                where = self._locate(graph, path, param, _numpy(base, dtype))
                if where is None:
                    if network == "autoencoder":  # an encoder-side weight: not in the decoder graph
                        continue
                    raise ValueError(f"the {graph} graph in {path!r} holds no initializer equal to {param}: "
                                     "export again from this model (python -m export onnx)")
                name, transposed = where
                value = _numpy(now, dtype)
                value = np.ascontiguousarray(value.T if transposed else value)
                mine = self.overrides.setdefault(graph, {})
                if torch.equal(now.detach().to(base.dtype), base):
                    mine.pop(name, None)  # back to the graph's own value
                else:
                    mine[name] = value
                updates.setdefault(graph, {})[name] = value
        return updates

    def _locate(self, graph: str, path: str, param: str, base: np.ndarray):
        key = (graph, param)
        if key not in self.located:
            if graph not in self.indexes:
                self.indexes[graph] = InitializerIndex(path)
            self.located[key] = self.indexes[graph].find(base)
        return self.located[key]
