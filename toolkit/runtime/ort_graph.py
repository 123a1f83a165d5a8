"""One ONNX graph in an onnxruntime session, called with torch tensors like the module it came from.

Shared by the parity check (export) and the ORT backend (deploy), so both feed a graph the same
way. Two ways to call it:

- plain (`io_binding=False`, what the parity check uses): inputs copied to numpy, `session.run`.
- IO binding (the ORT backend): inputs are bound where the torch tensors live, and the output is
  written into a buffer preallocated once per input shape, so no array is allocated or copied per
  call. On the CUDA provider with CUDA tensors the whole call stays on the GPU (no host round trip
  inside the denoising loop); on CPU it saves the numpy conversions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lftk.errors import LftkError, NotAvailableError

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def check_providers(providers: Sequence[str]) -> list[str]:
    """Refuse providers this onnxruntime build lacks instead of letting it fall back to CPU silently."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise NotAvailableError(
            f"onnxruntime provider(s) {', '.join(missing)} not available here (available: {', '.join(available)}); "
            "install onnxruntime-gpu on a CUDA machine, or use CPUExecutionProvider"
        )
    return list(providers)


class OrtGraph:
    """An InferenceSession plus the input names and dtypes its contract declares."""

    def __init__(
        self,
        path: Path,
        input_dtypes: dict[str, np.dtype | str],
        output_name: str,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        threads: int = 0,
        io_binding: bool = False,
    ):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: ORT's info lines drown the stage log
        opts.intra_op_num_threads = threads  # 0 = onnxruntime's choice (all physical cores)
        # Idle ORT workers busy-wait by default; next to torch (the runner's scheduler steps, parity,
        # a torch backend in the same process) they starve its threads on small CPUs. Waking them
        # costs microseconds against UNet calls of milliseconds.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=check_providers(providers))
        self.input_dtypes = {name: np.dtype(dt) for name, dt in input_dtypes.items()}
        self.output_name = output_name
        declared = [i.name for i in self.session.get_inputs()]
        if declared != list(self.input_dtypes):
            raise LftkError(f"{path}: graph inputs {declared} differ from the contract {list(self.input_dtypes)}")
        self.io_binding = io_binding
        # Where bound tensors live: the device of the first provider the session really runs on.
        self.device = torch.device("cuda", 0) if self.providers[0] == "CUDAExecutionProvider" else torch.device("cpu")
        self._outputs: dict[tuple, torch.Tensor] = {}  # input shapes -> preallocated output buffer

    @property
    def providers(self) -> list[str]:
        # What the session really runs on, which may be less than what was asked.
        return self.session.get_providers()

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        """The output as a torch tensor. With IO binding it is the preallocated buffer for these input
        shapes, valid until the next call with the same shapes (the ORT backend hands its callers copies)."""
        if self.io_binding:
            return self._bound(tensors)
        return self._plain(tensors)

    def _plain(self, tensors) -> torch.Tensor:
        feeds = {
            name: np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)
            for (name, dtype), t in zip(self.input_dtypes.items(), tensors)
        }
        (out,) = self.session.run([self.output_name], feeds)
        return torch.from_numpy(out)

    def _bound(self, tensors) -> torch.Tensor:
        binding = self.session.io_binding()
        kept = []  # bound tensors must outlive the run
        for (name, dtype), t in zip(self.input_dtypes.items(), tensors):
            t = t.detach().to(self.device, _TORCH_DTYPES[dtype.name]).contiguous()
            kept.append(t)
            binding.bind_input(name, self.device.type, self.device.index or 0, dtype, list(t.shape), t.data_ptr())
        key = tuple(tuple(t.shape) for t in kept)
        out = self._outputs.get(key)
        if out is None:  # first call at these shapes: learn the output's shape from a plain run
            shape = self._plain([t.cpu() for t in kept]).shape
            out = self._outputs[key] = torch.empty(shape, dtype=torch.float32, device=self.device)
        binding.bind_output(self.output_name, self.device.type, self.device.index or 0, np.float32, list(out.shape), out.data_ptr())
        if self.device.type == "cuda":
            binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        if self.device.type == "cuda":
            binding.synchronize_outputs()
        return out


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}
