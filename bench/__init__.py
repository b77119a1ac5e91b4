"""Benchmarks: programs that print a table and write JSON, each figure against a baseline."""
