# Inflight server image (not built yet in this project's CI; see README "Deploying").
#
# CPU (default): python slim + the CPU build of torch from PyTorch's own CPU wheel index (PyPI's torch==2.13.0 on
# Linux is the CUDA build, 526 MB plus the CUDA libraries):
#   docker build -t inflight .
# Where pip is set up to offer a CPU build of the pin itself (a local wheel or mirror), skip that index:
#   docker build --build-arg TORCH_INDEX= -t inflight .
# GPU: a CUDA base that has torch already, and the gpu extra (Triton):
#   docker build --build-arg BASE=nvcr.io/nvidia/pytorch:25.01-py3 --build-arg TORCH= --build-arg EXTRAS=gpu -t inflight .
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""
WORKDIR /opt/inflight
COPY pyproject.toml README.md ./
COPY engine_builder ./engine_builder
COPY server ./server
COPY models ./models
RUN if [ -n "$TORCH" ]; then pip install --no-cache-dir ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH"; fi \
    && pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"
ENV INFLIGHT_HOST=0.0.0.0 INFLIGHT_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
# Serves the bundled model by default; mount an engine or checkpoint directory and pass its path to serve another.
ENTRYPOINT ["inflight-serve"]
