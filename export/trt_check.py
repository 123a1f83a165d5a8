"""`lftk export --check-trt`: will TensorRT's ONNX parser take these graphs, with these profiles?

Runs on CPU without TensorRT. For every node of every exported graph (fp32, and the fp16/int8
variants): the op must be a standard ONNX op in TensorRT's published support list, its tensor
type must be one the list gives for it, and the node must meet the list's restrictions
(`trt_ops`). The opset must be in TensorRT's range. Then the shape profiles the manifest records
(what an engine build will ask for) must agree with the graph's inputs: names, ranks, dtypes,
static axes pinned to their size, one range per dynamic axis symbol, min <= opt <= max.

What it cannot see: layer-level limits the list does not state, memory, and tactic availability on
a given GPU; a real build (`lftk export --trt`, or the `trt` test tier) settles those.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lftk.errors import LftkError
from lftk.export import trt_ops
from lftk.runtime.contract import profile_shapes

log = logging.getLogger(__name__)

_NP_DTYPES = {"float32": 1, "float16": 10, "int64": 7, "int32": 6}
MAX_LISTED = 12  # failures named in the error message; parity.json-style details hold all


@dataclass
class _Facts:
    """Constants, inferred types and shapes of one graph (what restriction checks may ask)."""

    consts: dict = field(default_factory=dict)  # name -> numpy array, or None when stored externally
    types: dict = field(default_factory=dict)  # name -> ONNX elem type
    shapes: dict = field(default_factory=dict)  # name -> list of int | str

    def is_constant(self, name: str) -> bool:
        return name in self.consts

    def constant(self, name: str):
        return self.consts.get(name)

    def shape(self, name: str):
        return self.shapes.get(name)


def _value_info(vi, facts: _Facts) -> None:
    t = vi.type.tensor_type
    if t.elem_type:
        facts.types[vi.name] = t.elem_type
    if t.HasField("shape"):
        facts.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def _facts(model) -> _Facts:
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    facts = _Facts()
    g = model.graph
    for init in g.initializer:
        # Weights past 2 GB stay on disk (loaded without external data): constant, value unknown.
        facts.consts[init.name] = None if uses_external_data(init) else numpy_helper.to_array(init)
        facts.types[init.name] = init.data_type
        facts.shapes[init.name] = list(init.dims)
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        _value_info(vi, facts)
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    facts.consts[node.output[0]] = numpy_helper.to_array(a.t)
                    facts.types[node.output[0]] = a.t.data_type
    return facts


def _node_type(node, facts: _Facts) -> int | None:
    if node.op_type in trt_ops.TYPE_ATTR:
        attr, default = trt_ops.TYPE_ATTR[node.op_type]
        for a in node.attribute:
            if a.name == attr:
                return a.t.data_type if a.type == a.TENSOR else a.i
        return default
    i = trt_ops.TYPE_INPUT.get(node.op_type, 0)
    return facts.types.get(node.input[i]) if len(node.input) > i and node.input[i] else None


def _all_nodes(graph):
    """Nodes of a graph and of the subgraphs inside If/Loop/Scan nodes, outermost first."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _all_nodes(sub)


def check_node(node, facts: _Facts) -> str | None:
    """Why TensorRT's ONNX parser would refuse this node, or None."""
    if node.domain not in ("", "ai.onnx"):
        return f"custom-domain op {node.domain}::{node.op_type}: not an ONNX standard op (TensorRT needs a plugin)"
    op = node.op_type
    if op in trt_ops.UNSUPPORTED:
        return f"{op} is listed as unsupported by TensorRT ({trt_ops.SOURCE})"
    if op not in trt_ops.SUPPORTED:
        return f"{op} is not in TensorRT's ONNX operator list ({trt_ops.SOURCE})"
    allowed, restriction = trt_ops.SUPPORTED[op]
    types = [_node_type(node, facts)]
    if op in ("Cast", "CastLike"):
        types.append(next((a.i for a in node.attribute if a.name == "to"), None))
    for t in types:
        name = trt_ops.ONNX_TYPES.get(t, f"type {t}") if t else None
        if name and not trt_ops.type_supported(name, allowed):
            return f"{op} on {name} unsupported (TensorRT takes {', '.join(sorted(allowed))})"
    if restriction is not None:
        reason = restriction(node, facts)
        if reason:
            return f"{op}: {reason}"
    return None


def _dims(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def check_profiles(model, described: dict) -> list[str]:
    """Disagreements between a graph's inputs/outputs and the manifest's shapes and profiles."""
    problems = []
    inits = {i.name for i in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    want = [t["name"] for t in described["inputs"]]
    if [vi.name for vi in inputs] != want:
        return [f"graph inputs {[vi.name for vi in inputs]} differ from the manifest's {want}"]
    outs = [vi.name for vi in model.graph.output]
    if outs != [t["name"] for t in described["outputs"]]:
        problems.append(f"graph outputs {outs} differ from the manifest's {[t['name'] for t in described['outputs']]}")
    shapes = profile_shapes(described)
    ranges: dict[str, tuple] = {}
    for vi, spec in zip(inputs, described["inputs"]):
        lo, opt, hi = shapes[vi.name]
        dims = _dims(vi)
        elem = vi.type.tensor_type.elem_type
        if _NP_DTYPES.get(spec["dtype"]) != elem:
            problems.append(f"{vi.name}: graph dtype {trt_ops.ONNX_TYPES.get(elem, elem)} but manifest {spec['dtype']}")
        if len(dims) != len(lo):
            problems.append(f"{vi.name}: graph rank {len(dims)} but profile rank {len(lo)}")
            continue
        for axis, (d, a, b, c) in enumerate(zip(dims, lo, opt, hi)):
            if not 0 < a <= b <= c:
                problems.append(f"{vi.name} axis {axis}: profile min/opt/max {a}/{b}/{c} not ordered")
            elif isinstance(d, int) and d > 0 and not a == b == c == d:
                problems.append(f"{vi.name} axis {axis}: static {d} in the graph but the profile asks {a}/{b}/{c}")
            elif isinstance(d, str) and d != "?":
                seen = ranges.setdefault(d, (a, b, c))
                if seen != (a, b, c):
                    problems.append(f"dynamic axis '{d}': profile {seen} on one input, {(a, b, c)} on {vi.name}")
    return problems


def check_graph(path: Path, described: dict | None = None, label: str | None = None) -> dict:
    """Every node of the graph at `path` (external data not loaded), plus its profile agreement."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    label = label or path.name
    failures = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    lo, hi = trt_ops.OPSET_RANGE
    if opset is None or not lo <= opset <= hi:
        failures.append({"graph": label, "node": "(model)", "op": "", "reason": f"opset {opset} outside TensorRT's {lo}..{hi}"})
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:  # inference is a help for type checks, not a requirement
        log.debug("shape inference failed on %s: %s", path, exc)
        inferred = model
    facts = _facts(inferred)
    untyped = 0
    for node in _all_nodes(inferred.graph):
        if node.op_type not in trt_ops.TYPE_ATTR and _node_type(node, facts) is None and node.input:
            untyped += 1
        reason = check_node(node, facts)
        if reason:
            failures.append({"graph": label, "node": node.name or f"({node.op_type} -> {node.output[0]})",
                             "op": node.op_type, "reason": reason})
    if described is not None:
        failures += [{"graph": label, "node": "(profile)", "op": "", "reason": r} for r in check_profiles(model, described)]
    return {
        "graph": label,
        "nodes": len(model.graph.node),
        "ops": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
        "opset": opset,
        "untyped_nodes": untyped,  # nodes whose type inference could not tell (types then not checked)
        "failures": failures,
    }


def check_export(export_dir: Path, manifest: dict) -> dict:
    """Every graph an export lists (fp32 and variants), each against its component's profiles."""
    results = []
    for name, comp in manifest.get("components", {}).items():
        graphs = [("fp32", comp["files"][0]["path"])]
        graphs += [(p, v["files"][0]["path"]) for p, v in comp.get("variants", {}).items() if v["files"][0]["path"].endswith(".onnx")]
        for precision, rel in graphs:
            res = check_graph(Path(export_dir) / rel, comp, label=rel)
            res["precision"] = precision
            results.append(res)
    failures = [f for r in results for f in r["failures"]]
    return {"source": trt_ops.SOURCE, "passed": not failures, "graphs": results, "failures": failures}


def raise_on_failure(report: dict) -> None:
    failures = report["failures"]
    if failures:
        lines = [f"{f['graph']}: node {f['node']}: {f['reason']}" for f in failures[:MAX_LISTED]]
        more = f"\n  ... and {len(failures) - MAX_LISTED} more" if len(failures) > MAX_LISTED else ""
        raise LftkError(f"TensorRT check failed: {len(failures)} problem(s)\n  " + "\n  ".join(lines) + more)


def summary(report: dict) -> str:
    nodes = sum(r["nodes"] for r in report["graphs"])
    return f"{len(report['graphs'])} graph(s), {nodes} nodes, {len(report['failures'])} problem(s) ({report['source']})"
