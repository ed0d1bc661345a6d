"""Benchmarks: tools that measure the package, not part of it (``python benchmarks/bench.py --help``)."""
