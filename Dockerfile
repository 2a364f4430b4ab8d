# Inflight server image: `inflight-serve` on 0.0.0.0:8000, serving the bundled model (models/inflight-tiny) unless
# given the path of a mounted engine or checkpoint directory. Two stages: the first installs Python, a venv and the
# packages; the final one has Debian's/Ubuntu's python3, that venv, the source and models/ only (no compilers, apt
# lists or pip caches). It runs as the unprivileged user 10001 and checks /health as its HEALTHCHECK.
#
# GPU (default): a CUDA base and torch==2.13.0 from PyPI, which is the CUDA 13.0 build and brings its own CUDA
# libraries (the host needs an NVIDIA driver >= 580 and the NVIDIA container toolkit). Not built in this project:
# its machines reach no image registry and have no GPU runtime for Docker.
#   docker build -t inflight .
#   docker run --gpus all -p 8000:8000 inflight
# CPU: any Debian/Ubuntu base; torch's CPU build from PyTorch's CPU wheel index (DEVICE=cpu picks it):
#   docker build --build-arg DEVICE=cpu --build-arg BASE=debian:bookworm-slim -t inflight:cpu .
# CPU with no image registry and no PyTorch index (how tests/deploy/test_docker.py builds it): a base made with
# debootstrap, and the CPU wheel of torch put in deploy/docker/wheels/ (pip there offers wheels before any index):
#   tools/docker_base.sh    # makes local/debian:bookworm
#   cp /opt/wheels/torch-2.13.0+cpu-cp311-*.whl deploy/docker/wheels/
#   cp /etc/ssl/certs/ca-certificates.crt deploy/docker/certs/host.crt   # the proxy's CA, which pip here trusts
#   docker build --network host --build-arg DEVICE=cpu --build-arg BASE=local/debian:bookworm \
#       --build-arg TORCH_INDEX= -t inflight:cpu .
#
# Build arguments:
#   BASE         the base image of both stages; it must have apt-get and a python3 package (Debian, Ubuntu)
#   DEVICE       cuda (default) or cpu: which torch build is required (checked) and the server's default --device
#   TORCH        the torch requirement installed first (default torch==2.13.0, the version the tests run)
#   TORCH_INDEX  the index torch comes from: auto (default) is PyPI for cuda and PyTorch's CPU index for cpu;
#                empty: PyPI (with the wheels in deploy/docker/wheels/ first)
#   EXTRAS       the package's extras: auto (default) is "gpu" for cuda and none for cpu
#
# Built here with the classic builder (Docker 20.10); it uses no BuildKit-only syntax.
ARG BASE=nvidia/cuda:13.0.1-base-ubuntu24.04

FROM ${BASE} AS builder
ARG DEVICE=cuda
ARG TORCH="torch==2.13.0"
ARG TORCH_INDEX=auto
ARG EXTRAS=auto
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
# Certificates of a TLS-intercepting proxy between the build and the package index (deploy/docker/certs/*.crt),
# trusted by this stage's pip only; the final image does not have them.
COPY deploy/docker/certs/ /usr/local/share/ca-certificates/inflight/
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && update-ca-certificates \
    && python3 -m venv /opt/venv
COPY deploy/docker/wheels/ /tmp/wheels/
# torch first, in a layer of its own: it is most of the image and changes least. Its build must fit DEVICE (a CPU
# image with the multi-GB CUDA build, or a GPU image without CUDA, fails here).
RUN set -eu; \
    case "$DEVICE" in cuda|cpu) ;; *) echo "DEVICE must be cuda or cpu, not '$DEVICE'" >&2; exit 1 ;; esac; \
    index="$TORCH_INDEX"; \
    if [ "$index" = auto ]; then index=""; if [ "$DEVICE" = cpu ]; then index=https://download.pytorch.org/whl/cpu; fi; fi; \
    if [ -n "$TORCH" ]; then /opt/venv/bin/pip install --find-links /tmp/wheels ${index:+--index-url "$index"} "$TORCH"; fi; \
    /opt/venv/bin/python -c "import sys, torch; cpu = torch.version.cuda is None; \
sys.exit(0 if cpu == (sys.argv[1] == 'cpu') else f'DEVICE={sys.argv[1]} but pip installed torch {torch.__version__} \
(CUDA {torch.version.cuda}): set TORCH_INDEX or put the right wheel in deploy/docker/wheels/')" "$DEVICE"
# Then the package, editable (so that it finds models/ beside its source, as in a checkout), from pyproject.toml and
# stand-ins for README.md and the two packages: the final stage puts the real source at the same paths, and a change
# to the source rebuilds none of this. On CPU, triton (1 GB, which xgrammar requires on Linux x86-64) is removed:
# only GPU kernels use it, and both Inflight's kernels and xgrammar fall back to torch without it.
WORKDIR /opt/inflight
COPY pyproject.toml ./
RUN set -eu; \
    extras="$EXTRAS"; \
    if [ "$extras" = auto ]; then extras=""; if [ "$DEVICE" = cuda ]; then extras=gpu; fi; fi; \
    touch README.md; mkdir engine_builder server; touch engine_builder/__init__.py server/__init__.py; \
    /opt/venv/bin/pip install --find-links /tmp/wheels -e ".${extras:+[$extras]}"; \
    if [ "$DEVICE" = cpu ]; then /opt/venv/bin/pip uninstall -y triton; fi

FROM ${BASE}
ARG DEVICE=cuda
# python3 only (the venv's interpreter); apt's lists and caches go in the same layer.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/inflight --shell /usr/sbin/nologin inflight
WORKDIR /opt/inflight
COPY models ./models
COPY engine_builder ./engine_builder
COPY server ./server
RUN python3 -m compileall -q engine_builder server
COPY --from=builder /opt/venv /opt/venv
# PATH in full: a base made with `docker import` has none to extend.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/home/inflight \
    INFLIGHT_HOST=0.0.0.0 INFLIGHT_PORT=8000 INFLIGHT_DEVICE=${DEVICE}
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8000
# Healthy once /health is 200 (the model is loaded and the engine is alive); 503 while draining or when it died.
# It asks $INFLIGHT_PORT: a --port given on the command line instead is not seen here.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('INFLIGHT_PORT', '8000') + '/health', timeout=4).status != 200)"]
# SIGTERM (docker stop) drains running requests for up to --drain-timeout (30 s) and exits 0: give docker stop -t
# more than that. Arguments go to inflight-serve: a model path, options (or INFLIGHT_* variables).
ENTRYPOINT ["inflight-serve"]
