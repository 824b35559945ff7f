"""Measurements of the kit (run as modules: `python -m benchmarks.toy_results`)."""
