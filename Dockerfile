# syntax=docker/dockerfile:1
# The images of lftk (how to build, run, mount models, GPU flags, Jetson: deploy/README.md). Targets:
#   docker build --target train   -t lftk:train .      # CUDA, torch, DeepSpeed, bitsandbytes: lftk train
#   docker build --target runtime -t lftk:runtime .    # TensorRT, onnxruntime-gpu, no training dependencies: lftk serve, lftk infer
#   docker build --target runtime --build-arg RUNTIME_BASE=l4t -t lftk:runtime-l4t .   # Jetson (JetPack 6, arm64)
#   docker build --target runtime --build-arg RUNTIME_BASE=cpu -t lftk:runtime-cpu .   # no GPU: onnxruntime on CPU
# Every version is an ARG here and a label on the image. Other Python packages are held to the versions
# the tests passed with by deploy/constraints.txt (deploy/constraints-jp6.txt on JetPack's Python 3.10).

ARG LFTK_VERSION=0.1.0
ARG CUDA_RUNTIME_BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
# devel: DeepSpeed JIT-compiles its C++/CUDA ops (CPU Adam for optimizer offload) at first use.
ARG CUDA_DEVEL_BASE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
ARG L4T_BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0
# Which runtime: cuda (x86_64, CUDA 13), l4t (Jetson: JetPack 6.1, CUDA 12.6, TensorRT from JetPack) or
# cpu (any machine: Debian's Python, PyTorch's CPU wheel, onnxruntime on CPU; a few s per frame at 64 px).
ARG RUNTIME_BASE=cuda
ARG CPU_BASE=debian:12-slim
ARG CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG ONNXRUNTIME_VERSION=1.32.0
# torch 2.13.0 on PyPI is the CUDA 13.0 build (its nvidia-* wheels carry the CUDA libraries): the host
# driver must support CUDA 13 (R580 or newer). For another CUDA, set TORCH_INDEX to PyTorch's index
# for it and the bases to the matching nvidia/cuda tags.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://pypi.org/simple
# onnxruntime-gpu 1.31 on PyPI is built for CUDA 13 and cuDNN 9.
ARG ONNXRUNTIME_GPU_VERSION=1.31.1
# tensorrt-cu13 from NVIDIA's index (the PyPI package is a stub that fetches from there). 10.x: the
# engine builder (export/tensorrt.py) uses the TensorRT 10 API. "none" builds a runtime without TensorRT,
# which then serves with onnxruntime and says so at start.
ARG TENSORRT_VERSION=10.16.1.11
ARG TENSORRT_INDEX=https://pypi.nvidia.com
# Only its CLIP BPE vocabulary is used (lftk init-base --preset tiny), without its dependencies.
ARG OPEN_CLIP_VERSION=3.3.0
# Jetson: PyPI has no CUDA builds of torch or onnxruntime-gpu for JetPack; NVIDIA's Jetson AI Lab index does.
ARG JETSON_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126
ARG JETSON_TORCH_VERSION=2.8.0
ARG JETSON_ONNXRUNTIME_GPU_VERSION=1.23.0
# The TensorRT that JetPack 6.1 ships (python3-libnvinfer); the build stops if the base has another.
ARG JETPACK_TENSORRT=10.3
# The non-root user the images run as (not UID: bash keeps its own read-only $UID).
ARG LFTK_UID=10001

# ---- train: Python, torch, then the package and its training extras ------------------------------------
FROM ${CUDA_DEVEL_BASE} AS train
ARG LFTK_VERSION
ARG CUDA_DEVEL_BASE
ARG TORCH_VERSION
ARG TORCH_INDEX
ARG ONNXRUNTIME_GPU_VERSION
ARG OPEN_CLIP_VERSION
ARG LFTK_UID
LABEL org.opencontainers.image.title="lftk-train" \
      org.opencontainers.image.description="Training image of lftk: fine-tune InstructPix2Pix with DeepSpeed (lftk train), export to ONNX" \
      org.opencontainers.image.version="${LFTK_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${CUDA_DEVEL_BASE}" \
      lftk.version="${LFTK_VERSION}" \
      lftk.torch.version="${TORCH_VERSION}" \
      lftk.onnxruntime.version="${ONNXRUNTIME_GPU_VERSION}" \
      lftk.tensorrt.version="none: engines are built on the target GPU by the runtime image"
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    TORCH_EXTENSIONS_DIR=/work/.cache/torch_extensions
# python3-dev and g++: DeepSpeed compiles its ops at first use (on CPU too: its shared-memory collectives),
# and torch's extension headers include Python.h.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY deploy/constraints.txt /opt/lftk/constraints.txt
COPY pyproject.toml README.md /opt/lftk/src/
COPY toolkit /opt/lftk/src/toolkit
COPY export /opt/lftk/src/export
COPY deploy /opt/lftk/src/deploy
COPY recipes /opt/lftk/recipes
RUN pip install --no-cache-dir --constraint /opt/lftk/constraints.txt \
        "torch==${TORCH_VERSION}" "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" "/opt/lftk/src[train,data,ort-gpu]" \
    && pip install --no-cache-dir --no-deps "open_clip_torch==${OPEN_CLIP_VERSION}" \
    && useradd --uid "${LFTK_UID}" --create-home --shell /usr/sbin/nologin lftk \
    && mkdir -p /work \
    && chown "${LFTK_UID}:${LFTK_UID}" /work
USER ${LFTK_UID}
WORKDIR /work
ENTRYPOINT ["lftk"]
CMD ["train", "--help"]

# ---- runtime dependencies, x86_64 with CUDA 13 ---------------------------------------------------------
FROM ${CUDA_RUNTIME_BASE} AS runtime-cuda
ARG CUDA_RUNTIME_BASE
ARG TORCH_VERSION
ARG TORCH_INDEX
ARG ONNXRUNTIME_GPU_VERSION
ARG TENSORRT_VERSION
ARG TENSORRT_INDEX
LABEL org.opencontainers.image.base.name="${CUDA_RUNTIME_BASE}" \
      lftk.torch.version="${TORCH_VERSION}" \
      lftk.onnxruntime.version="${ONNXRUNTIME_GPU_VERSION}" \
      lftk.tensorrt.version="${TENSORRT_VERSION}"
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    LFTK_CONSTRAINTS=/opt/lftk/constraints.txt LFTK_ORT_EXTRA=ort-gpu
COPY deploy/constraints.txt /opt/lftk/constraints.txt
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir --constraint /opt/lftk/constraints.txt "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
    && if [ "${TENSORRT_VERSION}" != none ]; then \
           pip install --no-cache-dir --extra-index-url "${TENSORRT_INDEX}" "tensorrt-cu13==${TENSORRT_VERSION}"; \
       fi

# ---- runtime dependencies, Jetson (JetPack 6, arm64: build on the device or with buildx --platform linux/arm64)
FROM ${L4T_BASE} AS runtime-l4t
ARG L4T_BASE
ARG JETSON_INDEX
ARG JETSON_TORCH_VERSION
ARG JETSON_ONNXRUNTIME_GPU_VERSION
ARG JETPACK_TENSORRT
LABEL org.opencontainers.image.base.name="${L4T_BASE}" \
      lftk.torch.version="${JETSON_TORCH_VERSION}" \
      lftk.onnxruntime.version="${JETSON_ONNXRUNTIME_GPU_VERSION}" \
      lftk.tensorrt.version="${JETPACK_TENSORRT} (JetPack)"
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    LFTK_CONSTRAINTS=/opt/lftk/constraints-jp6.txt LFTK_ORT_EXTRA=ort-gpu
COPY deploy/constraints-jp6.txt /opt/lftk/constraints-jp6.txt
# TensorRT's Python bindings are JetPack's, built for the system Python: the venv sees them through
# --system-site-packages. The build stops here if JetPack's TensorRT is not JETPACK_TENSORRT (a package
# query, not an import: libnvinfer needs the GPU driver, which a build does not have).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv python3-libnvinfer \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv --system-site-packages /opt/venv \
    && pip install --no-cache-dir --index-url "${JETSON_INDEX}" \
        "torch==${JETSON_TORCH_VERSION}" "onnxruntime-gpu==${JETSON_ONNXRUNTIME_GPU_VERSION}" \
    && trt="$(dpkg-query -W -f='${Version}' python3-libnvinfer)" \
    && case "${trt}" in "${JETPACK_TENSORRT}".*) ;; *) echo "JetPack has TensorRT ${trt}, JETPACK_TENSORRT=${JETPACK_TENSORRT}" >&2; exit 1 ;; esac

# ---- runtime dependencies, CPU only (no GPU, no TensorRT: lftk serve on onnxruntime's CPU provider)
FROM ${CPU_BASE} AS runtime-cpu
ARG CPU_BASE
ARG TORCH_VERSION
ARG CPU_TORCH_INDEX
ARG ONNXRUNTIME_VERSION
LABEL org.opencontainers.image.base.name="${CPU_BASE}" \
      lftk.torch.version="${TORCH_VERSION}+cpu" \
      lftk.onnxruntime.version="${ONNXRUNTIME_VERSION}" \
      lftk.tensorrt.version="none: onnxruntime on CPU"
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    LFTK_CONSTRAINTS=/opt/lftk/constraints.txt LFTK_ORT_EXTRA=export LFTK_BACKEND=ort
COPY deploy/constraints.txt /opt/lftk/constraints.txt
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir --extra-index-url "${CPU_TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && python -c "import sys, torch; sys.exit('a CUDA torch in the CPU image: ' + torch.version.cuda if torch.version.cuda else None)" \
    && pip install --no-cache-dir --constraint /opt/lftk/constraints.txt "onnxruntime==${ONNXRUNTIME_VERSION}"

# ---- runtime: the package without training dependencies; engines for the GPU it runs on, built at first start
# (DL3006 asks for a tag on the image: runtime-${RUNTIME_BASE} is one of the stages above, not an image.)
# hadolint ignore=DL3006
FROM runtime-${RUNTIME_BASE} AS runtime
ARG LFTK_VERSION
ARG LFTK_UID
LABEL org.opencontainers.image.title="lftk-runtime" \
      org.opencontainers.image.description="Runtime image of lftk: lftk serve / lftk infer on exported models, TensorRT engines built for the GPU at first start" \
      org.opencontainers.image.version="${LFTK_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      lftk.version="${LFTK_VERSION}"
COPY pyproject.toml README.md /opt/lftk/src/
COPY toolkit /opt/lftk/src/toolkit
COPY export /opt/lftk/src/export
COPY deploy /opt/lftk/src/deploy
# The runtime must not carry the training stack: the build fails if anything pulled it in.
RUN pip install --no-cache-dir --constraint "${LFTK_CONSTRAINTS}" "/opt/lftk/src[${LFTK_ORT_EXTRA},serve]" \
    && python -c "import importlib.util as u, sys; bad = [m for m in ('deepspeed', 'peft', 'bitsandbytes') if u.find_spec(m)]; sys.exit('training dependencies in the runtime image: ' + ', '.join(bad) if bad else None)" \
    && lftk --help > /dev/null \
    && python -c "import lftk.deploy.firststart" \
    && useradd --uid "${LFTK_UID}" --create-home --shell /usr/sbin/nologin lftk \
    && mkdir -p /models /cache /work \
    && chown "${LFTK_UID}:${LFTK_UID}" /cache /work
# /cache: a volume for the engines built at first start (they fit one GPU and one TensorRT version).
ENV LFTK_CACHE=/cache LFTK_TRT_CACHE=/cache/trt LFTK_PORT=8000
USER ${LFTK_UID}
WORKDIR /work
EXPOSE 8000
# A first start on a new GPU builds engines before the server listens (minutes for SD 1.5): a long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LFTK_PORT', '8000') + '/healthz', timeout=4)"]
ENTRYPOINT ["python", "-m", "lftk.deploy.firststart"]
CMD ["serve", "--model", "/models/export", "--host", "0.0.0.0", "--port", "8000"]
