"""One ONNX graph in an onnxruntime session, called with torch tensors like the module it came from.

Shared by the parity check (export) and the ORT backend (deploy), so both feed a graph the same
way. The call goes through host numpy arrays; IO binding for device buffers belongs in `__call__`.
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

    @property
    def providers(self) -> list[str]:
        # What the session really runs on, which may be less than what was asked.
        return self.session.get_providers()

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        feeds = {
            name: np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)
            for (name, dtype), t in zip(self.input_dtypes.items(), tensors)
        }
        (out,) = self.session.run([self.output_name], feeds)
        return torch.from_numpy(out)
