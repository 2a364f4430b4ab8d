"""Inflight as a model of NVIDIA Triton Inference Server (its Python backend); see deploy/triton/README.md."""
