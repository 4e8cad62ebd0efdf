"""Benchmarks that check outputs first, then time against the fastest dense baseline."""
