"""Runtime model families; registry.py maps HF architecture names to them."""
