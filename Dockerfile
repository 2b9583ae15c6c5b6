# syntax=docker/dockerfile:1
# The udquant job with CUDA llama.cpp tools:
#
#   docker build -t udquant-job .
#   docker run --rm --init --gpus all -e HF_TOKEN -v udquant-data:/data udquant-job owner/Distill-Name
#
# The builder compiles llama.cpp through scripts/build-toolchain.sh, the script CI and the
# tests run, so the image holds the same pinned, digest-checked tree. The final stage is the
# CUDA runtime image plus a Python venv and five tools with their shared ggml/llama/mtmd libraries.
# Expected size: about 4.7 GB on disk (about 2.4 GB to pull): the CUDA runtime base ~3.3 GB
# (cuBLAS alone is ~0.8 GB), the venv with CPU torch, transformers and the converter's needs
# ~1.1 GB, llama.cpp ~0.3 GB. The CUDA kernels are in libggml-cuda.so once (measured with the
# same build script and nvcc 13.0 for sm_90 alone: 68 MB, the whole folder 78 MB; statically
# linked, each of the four tools carried its own copy: 300 MB), so four architectures ~0.28 GB.
#
# libggml-cuda.so links libcuda.so.1, which the NVIDIA Container Toolkit mounts: run with
# --gpus. Without it no tool could start, so the job stops at once and says so; with a driver
# but no usable GPU the tools run on the CPU, and the job warns that they did.
# No secret is ever passed to the build: HF_TOKEN exists only in `docker run -e HF_TOKEN`.

# Versions, recorded in the image's labels. LLAMA_CPP_TAG must equal scripts/llama-cpp-pin.env
# (the build fails otherwise, and tests/unit/test_packaging.py checks it).
ARG UDQUANT_VERSION=0.1.0
ARG LLAMA_CPP_TAG=b11434
# GPU architectures the kernels are compiled for (CMAKE_CUDA_ARCHITECTURES):
#   80 A100, A30 · 86 RTX 30xx, A10, A40, RTX A6000 · 89 RTX 40xx, L4, L40S · 90 H100, H200, GH200
# Each one adds build time and size. -real: machine code only; the last one also keeps its PTX, which
# newer GPUs (Blackwell) JIT-compile on first use. Narrow it for a single card:
# --build-arg CUDA_ARCHITECTURES=90
ARG CUDA_ARCHITECTURES="80-real;86-real;89-real;90"
# Parallel compile jobs (default: every core). Each nvcc job can take a few GB: lower it on a builder
# with little memory per core, e.g. --build-arg BUILD_JOBS=2
ARG BUILD_JOBS=""
# The converter needs torch only on the CPU; the CUDA wheel would add ~4 GB.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM nvidia/cuda:12.8.1-devel-ubuntu24.04 AS builder
ARG LLAMA_CPP_TAG
ARG CUDA_ARCHITECTURES
ARG BUILD_JOBS
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Distribution packages are not version-pinned: the base image tag fixes the Ubuntu release, and
# the archive drops superseded versions, so pins would break rebuilds without adding safety.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git cmake ninja-build make g++-14 python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# GCC 14, the compiler upstream's CUDA image builds with. (One CUDA build made elsewhere with GCC 13
# had libstdc++ linked into libggml-cuda.so, cause unconfirmed, and its tools aborted at start;
# build-toolchain.sh checks the compiler before building and every build after, so such a build
# fails here, not in a job.)
ENV CC=gcc-14 CXX=g++-14 CUDAHOSTCXX=g++-14

WORKDIR /src
# Only what the toolchain build reads, so editing the job does not recompile CUDA kernels.
COPY scripts/build-toolchain.sh scripts/check-compiler.sh scripts/check-toolchain.sh scripts/llama-cpp-pin.env scripts/
RUN pinned=$(sed -n 's/^LLAMA_CPP_TAG=//p' scripts/llama-cpp-pin.env) \
    && if [ "$pinned" != "$LLAMA_CPP_TAG" ]; then \
         echo "LLAMA_CPP_TAG=$LLAMA_CPP_TAG but scripts/llama-cpp-pin.env pins $pinned" >&2; exit 1; \
       fi
RUN scripts/build-toolchain.sh --from git --cuda --cuda-arch "$CUDA_ARCHITECTURES" --prefix /opt/llama.cpp \
      --jobs "${BUILD_JOBS:-$(nproc)}"

RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
COPY pyproject.toml README.md ./
COPY job job
COPY recipes recipes
RUN /opt/venv/bin/pip install --no-cache-dir ".[convert,eval]"

FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG UDQUANT_VERSION
ARG LLAMA_CPP_TAG
ARG CUDA_ARCHITECTURES
LABEL org.opencontainers.image.title="udquant-job" \
      org.opencontainers.image.description="UD-style mixed-precision GGUF quants of distills, with llama.cpp ${LLAMA_CPP_TAG} (CUDA ${CUDA_ARCHITECTURES})" \
      org.opencontainers.image.version="${UDQUANT_VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04" \
      udquant.llama-cpp.tag="${LLAMA_CPP_TAG}" \
      udquant.cuda.architectures="${CUDA_ARCHITECTURES}"

# python3 is the interpreter the builder's venv points at (same Ubuntu release, same path);
# libgomp1 is the OpenMP runtime libggml-cpu.so needs.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# A fixed UID above the distribution's range (ubuntu is 1000); /data belongs to it, so a new
# named volume mounted there starts out writable. For a bind mount, pass --user "$(id -u)".
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin udquant \
    && mkdir -p /data/hf /data/work \
    && chown -R udquant:udquant /data

COPY --from=builder /opt/llama.cpp /opt/llama.cpp
COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/data/hf \
    HF_HUB_DISABLE_TELEMETRY=1 \
    UDQUANT_LLAMA_CPP=/opt/llama.cpp \
    UDQUANT_WORK_DIR=/data/work \
    PYTHONUNBUFFERED=1

# Numeric, so a runtime that must prove the user is not root (runAsNonRoot) can.
USER 10001:10001
# Results go to ./udquant-out/<name>, on the volume next to the HF cache and the work dir.
WORKDIR /data
VOLUME /data
ENTRYPOINT ["udquant-job"]
