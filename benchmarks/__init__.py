"""Benchmarks of a source checkout (not part of the wheel); run each as ``python benchmarks/X.py``."""
