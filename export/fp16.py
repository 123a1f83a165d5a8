"""fp16 ONNX graphs for onnxruntime's GPU providers (CUDA, TensorRT EP), converted from the fp32 ones.

Weights and activations become float16; graph inputs and outputs stay float32, so the contract (and
every caller) is unchanged. The timestep path stays float32: sinusoidal embeddings of timesteps up
to 999 need more than fp16's 11 bits (at 999 one fp16 step is 0.5, a quarter turn of the fastest
sinusoid); diffusers' own fp16 pipelines compute that embedding in float32 for the same reason.

The graphs are checked with onnx.checker. They are not made for the CPU provider; when it can run
them anyway, the frame PSNR against fp32 is recorded with the provider it ran on, and when it
cannot, the record says so instead of a number.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lftk.errors import LftkError

log = logging.getLogger(__name__)

_EXTERNAL_DATA_BYTES = 2_000_000_000


def _toposort(graph) -> None:
    """The converter appends its input/output casts at the end; ONNX wants producers first."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in known for i in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise LftkError(f"fp16: graph {graph.name} has a cycle or a dangling input near {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def nodes_fed_only_by(graph, inputs: set[str]) -> list[str]:
    """Names of nodes computing values from `inputs` alone (e.g. the timestep embedding).

    Constants and shape arithmetic do not count as other inputs: diffusers broadcasts the timestep
    to the batch size read off the sample's shape, which is metadata, not sample values.
    """
    static = {i.name for i in graph.initializer}  # constants and values computed from shapes only
    derived = set(inputs)
    names = []
    for node in graph.node:  # topological order: producers come first
        feeds = [i for i in node.input if i]
        if node.op_type in ("Constant", "Shape") or (feeds and all(i in static for i in feeds)):
            static.update(node.output)
        elif feeds and all(i in static or i in derived for i in feeds) and any(i in derived for i in feeds):
            names.append(node.name)
            derived.update(node.output)
    return names


def convert_graph(src: Path, dest: Path, keep_fp32_inputs: tuple[str, ...] = ()) -> list[Path]:
    """Write the fp16 version of the graph at `src` to `dest` (+ dest.data past 2 GB); checker-validated."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src), load_external_data=True)
    blocked = nodes_fed_only_by(model.graph, set(keep_fp32_inputs)) if keep_fp32_inputs else []
    try:
        half = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked or None)
    except Exception as exc:  # the converter raises many kinds; name the graph
        raise LftkError(f"fp16 conversion of {src} failed: {exc}") from exc
    _toposort(half.graph)
    for stale in (dest, dest.with_name(dest.name + ".data")):
        stale.unlink(missing_ok=True)
    if half.ByteSize() > _EXTERNAL_DATA_BYTES:
        data = dest.name + ".data"
        onnx.save_model(half, str(dest), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
        files = [dest, dest.with_name(data)]
    else:
        onnx.save_model(half, str(dest))
        files = [dest]
    onnx.checker.check_model(str(dest))
    log.debug("fp16 %s: %d nodes kept in fp32 (timestep path)", dest.name, len(blocked))
    return files
