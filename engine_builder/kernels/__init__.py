"""Compute kernels, one op per module. Each op has a torch reference used on CPU; GPU kernels plug in here."""
