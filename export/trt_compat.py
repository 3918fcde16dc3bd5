"""Will TensorRT's ONNX parser take this graph? Checked without TensorRT, against the parser's
published operator table (``trt_supported_ops.json``: onnx-tensorrt's ``docs/operators.md``, kept in
the repo with its source and version).

Checked: the opset lies in the parser's range; every node (subgraphs and functions included) is a
standard-domain operator the parser supports; the element type of each node's first input is one
the table lists for that operator; inputs the parser needs as build-time constants (reduction axes,
Squeeze/Unsqueeze axes, ...) are initializers or Constant outputs; single-output-only operators have
one output; Resize uses supported modes. The table's notes decide two type questions: DOUBLE is cast
down to FLOAT by the parser, and UINT8 is accepted at graph inputs and outputs only.
"""

import json
import os
from functools import lru_cache
from typing import Dict, List, Optional, Set

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trt_supported_ops.json")

# ONNX TensorProto element types -> the names the operator table uses.
_TYPE_NAMES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE",
               16: "BF16", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 22: "INT4", 23: "FP4"}


@lru_cache(maxsize=None)
def operator_table(path: str = TABLE_PATH) -> Dict:
    with open(path) as f:
        return json.load(f)


def _opset(model, domain_names=("", "ai.onnx")) -> Optional[int]:
    for imp in model.opset_import:
        if imp.domain in domain_names:
            return imp.version
    return None


def _types(model) -> Dict[str, int]:
    """Element type of every named value (inputs, initializers, inferred intermediate values)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is a help here, not a requirement
        inferred = model
    types = {}
    graph = inferred.graph
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def check_model(model, table: Optional[Dict] = None) -> List[str]:
    """Problems TensorRT's parser would have with ``model`` (an ``onnx.ModelProto`` or a path; loaded
    without external data): an empty list means the graph uses only what the parser supports."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model), load_external_data=False)
    table = table or operator_table()
    problems: List[str] = []
    opset = _opset(model)
    if opset is None or not table["opset_min"] <= opset <= table["opset_max"]:
        problems.append(f"opset {opset} is outside TensorRT {table['tensorrt_version']}'s range "
                        f"{table['opset_min']}..{table['opset_max']}")
    supported, checks = table["supported"], table["checks"]
    types = _types(model)
    graph_io = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    constants: Set[str] = {i.name for i in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}

    def visit(nodes, where: str):
        for node in nodes:
            label = f"{where}{node.op_type} node {node.name or '?'}"
            if node.domain not in table["domains"]:
                problems.append(f"{label}: custom domain {node.domain!r} (TensorRT parses standard ONNX ops only)")
                continue
            if node.op_type not in supported:
                why = "listed as unsupported" if node.op_type in table["unsupported"] else "not in the table"
                problems.append(f"{label}: operator {node.op_type} is {why}")
                continue
            allowed = set(supported[node.op_type]["types"])
            if node.input and node.input[0] in types:
                t = _TYPE_NAMES.get(types[node.input[0]], str(types[node.input[0]]))
                ok = (t in allowed or (t == "DOUBLE" and "FP32" in allowed)
                      or (t == "UINT8" and node.input[0] in graph_io))
                if not ok:
                    problems.append(f"{label}: input type {t} not among {sorted(allowed)}")
            for index in checks["constant_inputs"].get(node.op_type, []):
                if len(node.input) > index and node.input[index] and node.input[index] not in constants:
                    problems.append(f"{label}: input {index} ({node.input[index]}) must be a build-time constant")
            if node.op_type in checks["first_output_only"] and sum(1 for o in node.output[1:] if o) > 0:
                problems.append(f"{label}: only the first output is supported")
            if node.op_type == "Resize":
                for attr in node.attribute:
                    allowed_values = checks["resize"].get(attr.name)
                    if allowed_values is not None and attr.s.decode() not in allowed_values:
                        problems.append(f"{label}: {attr.name}={attr.s.decode()!r} not among {allowed_values}")
                    if attr.name == "antialias" and attr.i:
                        problems.append(f"{label}: antialiasing is not supported")
            for attr in node.attribute:
                subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
                for sub in subgraphs:
                    visit(sub.node, f"{label} > ")

    visit(model.graph.node, "")
    for fn in model.functions:
        visit(fn.node, f"function {fn.name}: ")
    return problems
