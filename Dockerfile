# syntax=docker/dockerfile:1
# lftk images. Targets:
#   docker build --target train   -t lftk:train .     # CUDA + DeepSpeed + bitsandbytes: `lftk train RECIPE`
#   docker build --target runtime -t lftk:runtime .   # inference only: `lftk infer` on an export dir
# The runtime image carries no training dependencies (deepspeed, peft, bitsandbytes).

ARG CUDA_BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
ARG TORCH_VERSION=2.5.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124

FROM ${CUDA_BASE} AS base
ARG TORCH_VERSION
ARG TORCH_INDEX
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip g++ \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/lftk
ENV PATH=/opt/lftk/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY toolkit toolkit
COPY export export
COPY deploy deploy
COPY recipes recipes

FROM base AS train
RUN pip install ".[train,data]" && pip install --no-deps open_clip_torch
RUN useradd --create-home lftk
USER lftk
WORKDIR /work
ENTRYPOINT ["lftk"]
CMD ["train", "--help"]

FROM base AS runtime
RUN pip install ".[ort-gpu]"
RUN useradd --create-home lftk
USER lftk
WORKDIR /work
ENTRYPOINT ["lftk"]
CMD ["infer", "--help"]
