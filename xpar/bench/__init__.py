"""Benchmarks: scripts that print a table of timings measured in one run."""
