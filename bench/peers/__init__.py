"""Reference servers that bench/compare.py measures forkserver against."""
