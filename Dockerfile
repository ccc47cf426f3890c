# syntax=docker/dockerfile:1
# The tuner image: `tuner` is the entry point; the bundled studies/ and configs/ are in /app.
#
# CPU by default: python:3.11-slim and the CPU wheel of torch.
#   docker build -t tuner .
# GPU workers: DEVICE=cuda picks the CUDA base stage below and, with it, the CUDA wheel index.
#   docker build --build-arg DEVICE=cuda -t tuner:cuda .        (compose: TUNER_DEVICE=cuda docker compose build)
#   CUDA_WHEELS picks the wheel's CUDA (cu126, cu128, ...); the host driver must support it.
ARG DEVICE=cpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04

FROM python:3.11-slim AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv

# The CUDA wheels carry their own CUDA libraries; the base image adds what the NVIDIA container
# toolkit reads (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES) to mount the host's driver.
FROM ${CUDA_IMAGE} AS base-cuda
ARG CUDA_WHEELS=cu128
ENV TORCH_INDEX=https://download.pytorch.org/whl/${CUDA_WHEELS}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

FROM base-${DEVICE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# torch first, pinned (the Makefile's pin), from its own index: installing the project afterwards
# finds `torch>=2.4` satisfied and never swaps in another build of torch
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX}"
COPY pyproject.toml ./
COPY tuner ./tuner
RUN pip install .
COPY studies ./studies
COPY configs ./configs
# not root: the artifacts volume is created from /artifacts, so it starts out owned by this user
RUN useradd --create-home --uid 1000 tuner && mkdir -p /artifacts && chown tuner /artifacts
USER tuner
ENV TUNER_ARTIFACTS=/artifacts
ENTRYPOINT ["tuner"]
CMD ["--help"]
