"""Benchmarks for streamer: the pure core step alone, and the daemon end to end through Kafka.

Run with `python3 -m bench.run`; see bench/README.md for what each number means.
"""
