"""The TensorRT executor: an engine called like an onnxruntime graph (TensorRT 10.x and 11.x
Python API, imported lazily), and what the machine offers TensorRT. Engines are built by the export
stage (lftk.export.tensorrt); the runtime backend and the export's engine parity run them here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lftk.errors import LftkError, NotAvailableError

log = logging.getLogger(__name__)


def machine() -> dict:
    """What this machine offers for TensorRT: versions, GPU, compute capability, and what is missing."""
    info: dict = {"tensorrt": None, "cuda": torch.cuda.is_available(), "gpu": None, "compute_capability": None, "missing": []}
    try:
        import tensorrt as trt

        info["tensorrt"] = trt.__version__
    except ImportError:
        info["missing"].append(
            "the TensorRT Python package (pip install tensorrt; its wheels come from NVIDIA's index, pypi.nvidia.com)"
        )
    if info["cuda"]:
        major, minor = torch.cuda.get_device_capability()
        info["compute_capability"] = f"{major}.{minor}"
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["missing"].insert(0, "a CUDA GPU (torch.cuda.is_available() is False)")
    return info


def require_tensorrt() -> dict:
    """machine(), or NotAvailableError naming everything that is missing."""
    info = machine()
    if info["missing"]:
        raise NotAvailableError(
            "TensorRT engines need " + " and ".join(info["missing"])
            + "; export ONNX here (lftk export MODEL --onnx) and build engines on the target GPU with --trt"
        )
    return info


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}


class TrtEngine:
    """One engine, called with torch tensors like OrtGraph (inputs in contract order, one output).

    Buffers are torch CUDA tensors; execution is `execute_async_v3` on a CUDA stream (TensorRT warns
    that the legacy default stream costs extra synchronisation). Defaults suit a one-off check (the
    export's engine parity): a stream of its own, TensorRT's own scratch memory, the output copied to
    the host. The runtime backend asks for more (`TrtBackend`):

    - `stream`: one stream shared by all four engines, so they run in order without host syncs;
    - `shared_memory`: the context gets no scratch memory of its own; `use_memory` hands it a slice of
      one pool sized for the largest engine (the four never run at the same time);
    - `host_output=False`: the output stays on the GPU (float32, a fresh tensor), so the denoising loop
      never goes through the host;
    - `cuda_graph`: each input-shape combination is captured once as a CUDA graph over static
      input/output buffers and replayed (one launch per UNet call instead of one per kernel).
    """

    def __init__(
        self,
        path: Path,
        input_names: list[str],
        output_name: str,
        stream: "torch.cuda.Stream | None" = None,
        shared_memory: bool = False,
        host_output: bool = True,
        cuda_graph: bool = False,
    ):
        import tensorrt as trt

        self.path = Path(path)
        self._runtime = trt.Runtime(_logger())
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise LftkError(f"{path}: TensorRT could not load this engine (built by another TensorRT or for another GPU?)")
        if shared_memory:
            strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
            self.context = self.engine.create_execution_context(strategy)
        else:
            self.context = self.engine.create_execution_context()
        self.stream = stream or torch.cuda.Stream()
        self.host_output, self.cuda_graph = host_output, cuda_graph
        self._graphs: dict[tuple, tuple] = {}  # input shapes -> (CUDAGraph, static inputs, static output)
        self.input_names, self.output_name = list(input_names), output_name
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if sorted(inputs) != sorted(self.input_names) or output_name not in names:
            raise LftkError(f"{path}: engine tensors {names} differ from the contract {self.input_names} -> {output_name}")

    @property
    def memory_size(self) -> int:
        """Scratch bytes the engine needs at its largest profile shapes."""
        eng = self.engine
        return int(eng.device_memory_size_v2 if hasattr(eng, "device_memory_size_v2") else eng.device_memory_size)

    def use_memory(self, pool: torch.Tensor) -> None:
        """Run in (the start of) `pool`, a CUDA uint8 tensor of at least `memory_size` bytes."""
        if pool.numel() < self.memory_size:
            raise LftkError(f"{self.path}: needs {self.memory_size} bytes of scratch memory, the pool has {pool.numel()}")
        if hasattr(self.context, "set_device_memory"):  # TensorRT >= 10.1
            self.context.set_device_memory(pool.data_ptr(), pool.numel())
        else:
            self.context.device_memory = pool.data_ptr()

    @property
    def providers(self) -> list[str]:
        return [f"TensorRT:{torch.cuda.get_device_name()}"]

    def _dtype(self, name: str) -> torch.dtype:
        return _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]

    def _bind(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Set shapes and addresses for these device inputs; a new output tensor, bound."""
        for name, t in zip(self.input_names, inputs):
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(shape, dtype=self._dtype(self.output_name), device="cuda")
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        return out

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise LftkError(f"{self.path}: TensorRT execution failed")

    def _replay(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        key = tuple(tuple(t.shape) for t in inputs)
        if key not in self._graphs:
            static = [t.clone() for t in inputs]
            out = self._bind(static)
            self._execute()  # TensorRT must run once at new shapes before a capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._execute()
            self._graphs[key] = (graph, static, out)
        graph, static, out = self._graphs[key]
        for dst, src in zip(static, inputs):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return out

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        caller = torch.cuda.current_stream()  # where the inputs were made and the output will be used
        self.stream.wait_stream(caller)  # the caller's last kernels (the scheduler step) may still be writing them
        with torch.cuda.stream(self.stream):
            inputs = [t.to("cuda", self._dtype(n), non_blocking=True).contiguous() for n, t in zip(self.input_names, tensors)]
            if self.cuda_graph:
                static = self._replay(inputs)  # overwritten by the next replay: hand out a copy
                out = static.clone() if static.dtype == torch.float32 else static.float()
            else:
                out = self._bind(inputs)
                self._execute()
                out = out.float()
            if self.host_output:
                out = out.cpu()  # on this stream: waits for the engine
            else:
                out.record_stream(caller)  # made on this stream, used on the caller's: not reused before it is done
        if self.host_output:
            self.stream.synchronize()
        else:
            caller.wait_stream(self.stream)
        return out
