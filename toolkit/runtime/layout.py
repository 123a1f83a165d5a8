"""The names of what lftk writes: run dirs, export dirs, model metadata. One module, so that the
trainer, the exporter, the resolver and the backends cannot disagree about a file name.

    RUN/resolved_config.yaml   the recipe as run (marks a run dir)
    RUN/checkpoints/step-N/    resumable checkpoints
    RUN/final/                 the trained model: a diffusers pipeline dir, merged, stock-loadable
    RUN/final/lora/            a LoRA run's adapters beside the merged weights
    RUN/metrics.jsonl          one JSON line per logged step

    EXPORT/manifest.json       written last: marks an export dir, hashes every file
    EXPORT/onnx/               the ONNX graphs (and their precision variants)
    EXPORT/trt/                TensorRT engines
    EXPORT/pipeline/           the source pipeline (tokenizer, scheduler config, weights)

    PIPELINE/lftk_model.json   what lftk knows about a pipeline dir (preset, resolution, sampling)
    PIPELINE/model_index.json  diffusers' own marker of a pipeline dir
"""

from __future__ import annotations

RUN_CONFIG = "resolved_config.yaml"
RUN_CHECKPOINTS = "checkpoints"
RUN_FINAL = "final"
RUN_METRICS = "metrics.jsonl"
LORA_DIR = "lora"

MANIFEST = "manifest.json"
ONNX_DIR = "onnx"
TRT_DIR = "trt"
PIPELINE_DIR = "pipeline"

MODEL_META = "lftk_model.json"
MODEL_INDEX = "model_index.json"
