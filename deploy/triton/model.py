"""The `inflight` model of a Triton model repository: Inflight's engine behind Triton's Python backend.

build_repository.py copies this file to MODEL_REPOSITORY/inflight/1/model.py; the code is server/triton/backend.py
(Triton's Python needs the Inflight package importable: installed, or its checkout on PYTHONPATH).
"""

from server.triton.backend import TritonPythonModel

__all__ = ["TritonPythonModel"]
