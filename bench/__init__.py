"""Benchmarks for the rollout engine and the memory-bounded loss (`python -m bench`)."""
