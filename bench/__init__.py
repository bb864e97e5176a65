"""Load generators and benchmarks for forkserver and any other TCP service."""
