"""`lftk bench`: every backend and precision of one export, timed the same way, checked against torch.

One row per (backend, precision): the torch modules (fp32, the reference; fp16 too on a CUDA machine;
with `compile` a torch.compile row), the stock diffusers pipeline on the same weights (the peer a
user without lftk runs), each ONNX precision the manifest lists (`targets_in`) under onnxruntime,
each TensorRT engine set. A row that cannot run
here says why ("not available: TensorRT engines need a CUDA GPU ...") instead of vanishing. Per row:

  ms/UNet step   one UNet call with 1 frame x the CFG branches (batch 3), mean over a rollout,
                 median over repeats, after warm-up
  ms/frame, f/s  a FRAMES-frame autoregressive rollout done as FRAMES single-frame predict calls
  batched f/s    FRAMES independent start frames predicted together by one `Runner.predict`
                 call: one UNet call per step at batch 3 x FRAMES (the sweep-style batch)
  peak RSS       the process's resident memory during the row, sampled (it includes whatever the
                 process loaded before: libraries, earlier rows' allocator pools)
  PSNR           the batched frames against torch fp32's for the same inputs and seed (torch's
                 own row is the reference: "-"; the diffusers row against torch's without keep rules)
  vs diffusers   the stock pipeline's ms/frame over the row's: lftk's speed-up over it

MODEL may also be a pipeline or run dir (no ONNX export yet): then only torch and diffusers rows run, and the ort
and trt rows say what to export first. That is how a full-size model is timed on a GPU without
writing gigabytes of ONNX (`--resolution` picks the size; an export's is fixed by its manifest).

`run_bench` returns the rows; `format_table` renders them (the CLI prints it). `--json` writes the
rows; `--log` appends them, with the machine and versions, as one JSON line per run.

The parts: `cases` (which rows, each opened through `lftk.runtime.backends.open_backend`), `timing`
(how a row is timed), `memory` (peak RSS and CUDA memory), `reference` (PSNR against torch fp32 and
each precision's bar), `report` (table and log), `run` (`run_bench`).
"""

from lftk.deploy.bench.report import append_log, format_table, machine_info
from lftk.deploy.bench.run import KEYS, BenchSettings, run_bench

__all__ = ["KEYS", "BenchSettings", "append_log", "format_table", "machine_info", "run_bench"]
