"""``python -m kronfisher.data {prepare,verify} [NAME ...]``: build or check cached data sets."""

from __future__ import annotations

import argparse
import sys
import time

from . import DATASETS, DatasetError, load_dataset, splits, verify


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m kronfisher.data", description=__doc__)
    parser.add_argument("action", choices=["prepare", "verify"])
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"data sets (default: {' '.join(DATASETS)})"
    )
    parser.add_argument(
        "--cache-dir", help="cache directory (default: $KRONFISHER_DATA or ~/.cache/kronfisher)"
    )
    args = parser.parse_args(argv)
    status = 0
    for name in args.names or DATASETS:
        start = time.perf_counter()
        try:
            if args.action == "prepare":
                for split in splits(name):
                    load_dataset(name, split, cache_dir=args.cache_dir)
                print(f"{name}: ready ({time.perf_counter() - start:.1f} s)")
            else:
                for split, digest in verify(name, cache_dir=args.cache_dir).items():
                    print(f"{name} {split}: OK {digest}")
        except DatasetError as exc:
            print(f"{name}: ERROR: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
