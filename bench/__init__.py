"""Benchmarks and GPU calibration tools (need a CUDA GPU; not part of the installed package)."""
