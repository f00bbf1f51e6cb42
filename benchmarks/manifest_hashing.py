"""How much a manifest costs: hashing a run's files the first time, and again on a skipped rerun.

Prints a table. Usage: python benchmarks/manifest_hashing.py [--files 2000] [--megabytes 1024]
The files are written to a temporary directory on the filesystem of --where (default /tmp),
so the first pass reads from the page cache: it measures hashing, not the disk.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from common.manifest import hash_tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--megabytes", type=int, default=1024)
    parser.add_argument("--where", default=tempfile.gettempdir())
    args = parser.parse_args()
    size = args.megabytes * 2**20 // args.files
    with tempfile.TemporaryDirectory(dir=args.where) as directory:
        root = Path(directory)
        for index in range(args.files):
            (root / f"shard_{index:05d}.bin").write_bytes(os.urandom(size))
        total_mb = size * args.files / 2**20
        start = time.perf_counter()
        first = hash_tree(root)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        again = hash_tree(root, known=first.files)
        cached = time.perf_counter() - start
        assert again.sha256 == first.sha256
    print(f"host: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print("| pass | files | MB | seconds | MB/s | µs per file |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| first (read and hash) | {args.files:,} | {total_mb:,.0f} | {cold:.2f} | {total_mb / cold:,.0f} | {1e6 * cold / args.files:,.0f} |"
    )
    print(
        f"| rerun (size+mtime unchanged) | {args.files:,} | {total_mb:,.0f} | {cached:.3f} | - | {1e6 * cached / args.files:,.1f} |"
    )


if __name__ == "__main__":
    main()
