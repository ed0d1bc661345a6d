"""Benchmarks: tools that measure the package, not part of it (``python -m benchmarks.bench --help``)."""
