# Inflight server image. GPU: build on a CUDA base with the CUDA build of torch, e.g.
#   docker build --build-arg BASE=nvcr.io/nvidia/pytorch:25.01-py3 --build-arg TORCH= -t inflight .
# CPU (default): python slim + the CPU torch wheel.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH="torch==2.13.0"
WORKDIR /opt/inflight
COPY pyproject.toml README.md ./
COPY engine_builder ./engine_builder
COPY server ./server
COPY models ./models
RUN if [ -n "$TORCH" ]; then pip install --no-cache-dir "$TORCH"; fi && pip install --no-cache-dir ".[gpu]" || pip install --no-cache-dir .
ENV INFLIGHT_HOST=0.0.0.0 INFLIGHT_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
# Serves the bundled model by default; mount an engine or checkpoint directory and pass its path to serve another.
ENTRYPOINT ["inflight-serve"]
