"""Inflight engine builder: Hugging Face checkpoint → engine directory → runtime model."""

__version__ = "0.1.0"
