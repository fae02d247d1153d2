# syntax=docker/dockerfile:1
# BitSkip Serve.
#
#   GPU (default): docker build -t bitskip-serve:gpu .
#   CPU only:      docker build --build-arg VARIANT=cpu -t bitskip-serve:cpu .
#
# GPU: the official PyTorch CUDA runtime image; its torch is kept (pip gets it as a constraint, so
# the project's `torch>=2.4` never re-downloads it). CPU: python:3.11-slim plus the CPU-only torch
# wheel from the PyTorch CPU index (TORCH_INDEX_URL; the build machine must reach it).
#
# `bitskip serve` picks its device itself (--device auto): the GPU image's torch brings Triton, so
# with a GPU visible it serves through the Triton kernels and CUDA graphs, else from the CPU.
#
# Runs `bitskip serve --host 0.0.0.0` on port 8000 as the non-root user `bitskip`. Without
# BITSKIP_MODEL (or --model) it serves the bundled default model; other checkpoints go in the
# /models volume: docker run -v "$PWD/ckpt:/models:ro" -e BITSKIP_MODEL=/models/my-model ...
ARG VARIANT=gpu

FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime AS base-gpu

FROM python:3.11-slim-bookworm AS base-cpu
ARG TORCH_VERSION=2.5.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# gcc builds the native CPU kernel (engine/kernels/native) below.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BITSKIP_CACHE=/opt/bitskip/cache

COPY pyproject.toml README.md /tmp/src/
COPY models /tmp/src/models
COPY engine /tmp/src/engine
COPY server /tmp/src/server

# Pin torch to the version already in the base image, then install the project (not editable:
# models/default/ goes into site-packages as package data) and drop the sources.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt /tmp/src \
    && rm -rf /tmp/src /tmp/torch-constraint.txt

# The bundled default model (models/default/, package data) is served when no model is named;
# the build prints which checkpoint that resolves to.
WORKDIR /
# The native CPU kernel is compiled into the cache now (the GPU base has no compiler: its CPU path
# then says so once and uses torch).
RUN python -c "from models.default_model import resolve_model; print('default model:', resolve_model(None))" \
    && python -m engine.kernels.native \
    && chmod -R a+rX /opt/bitskip

RUN useradd --create-home --uid 10001 --user-group bitskip \
    && mkdir -p /models \
    && chown bitskip:bitskip /models
VOLUME ["/models"]

USER 10001:10001
WORKDIR /home/bitskip
EXPOSE 8000
STOPSIGNAL SIGTERM
# /ready: model loaded and the engine loop stepping. python is in both bases; curl is not.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4).status != 200)"]
CMD ["bitskip", "serve", "--host", "0.0.0.0"]
