# A CPU stand-in for PyTorch's base image (pytorch/pytorch:<torch>-cuda...-runtime), for
# tests/docker/build-and-run.sh on machines that cannot pull from Docker Hub. Like that image it
# is a Linux with a Python environment first on PATH that already holds torch (there /opt/conda,
# here /opt/venv) and no compiler; unlike it, torch is the CPU build and there is no CUDA.
#
# ROOTFS: a Debian root file system with python3, python3-venv and ca-certificates, imported by
# the script (mmdebstrap | docker import). The build context holds the torch wheel (cp311, CPU)
# and the CA bundle of the machine that builds it.
ARG ROOTFS
FROM ${ROOTFS}

# On CI machines HTTPS goes through a proxy whose certificate only the host's bundle holds; pip
# (in this build and in the project's) reads it from PIP_CERT. A file of its own, so that an
# update-ca-certificates in a later layer cannot drop it.
COPY ca-certificates.crt /usr/local/share/ci-ca-certificates.crt
ENV PIP_CERT=/usr/local/share/ci-ca-certificates.crt \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

COPY torch-*.whl /tmp/wheels/
RUN python3 -m venv /opt/venv \
    && pip install /tmp/wheels/torch-*.whl \
    && rm -rf /tmp/wheels \
    && python3 -c "import torch; assert not torch.cuda.is_available(); print('torch', torch.__version__)"
