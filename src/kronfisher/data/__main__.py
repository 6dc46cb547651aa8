"""``python -m kronfisher.data {prepare,verify,report,stats,samples} [NAME ...]``.

prepare: build or fetch the cached sets; verify: re-check their pinned checksums; report: the
platform facts and generator probe checksums to attach to a bug report when a generated set
misses its pin; stats: mean-image BCE plateau, mean intensity and non-zero fraction of the
[0, 1]-valued splits; samples: a PNG of the first training images (needs matplotlib).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import DATASETS, DatasetError, load_dataset, splits, verify


def _stats(name: str, cache_dir: str | None) -> None:
    from .preview import image_stats

    for split in splits(name):
        x = load_dataset(name, split, cache_dir=cache_dir).numpy()
        if name == "faces":
            print(f"{name} {split}: standardised values, no [0, 1] statistics")
            continue
        s = image_stats(x)
        print(f"{name} {split}: mean-image BCE {s.mean_image_bce:.4f} nats/pixel, mean "
              f"intensity {s.mean_intensity:.4f}, non-zero pixels {s.nonzero_fraction:.4f}")
        if split == "train":
            s16 = image_stats(x[:16000])
            print(f"{name} train[:16000]: mean-image BCE {s16.mean_image_bce:.4f}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m kronfisher.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["prepare", "verify", "report", "stats", "samples"])
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"data sets (default: {' '.join(DATASETS)})"
    )
    parser.add_argument(
        "--cache-dir", help="cache directory (default: $KRONFISHER_DATA or ~/.cache/kronfisher)"
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="samples: PNG path (default: NAME_samples.png)")
    args = parser.parse_args(argv)
    if args.action == "report":
        from .report import report

        text, ok = report([n for n in (args.names or ["curves", "faces"])])
        print(text)
        return 0 if ok else 1
    status = 0
    for name in args.names or DATASETS:
        start = time.perf_counter()
        try:
            if args.action == "prepare":
                for split in splits(name):
                    load_dataset(name, split, cache_dir=args.cache_dir)
                print(f"{name}: ready ({time.perf_counter() - start:.1f} s)")
            elif args.action == "verify":
                for split, digest in verify(name, cache_dir=args.cache_dir).items():
                    print(f"{name} {split}: OK {digest}")
            elif args.action == "stats":
                _stats(name, args.cache_dir)
            else:
                from .preview import save_contact_sheet

                x = load_dataset(name, "train", cache_dir=args.cache_dir)[:32].numpy()
                side = int(round(x.shape[1] ** 0.5))
                out = args.out or Path(f"{name}_samples.png")
                title = f"{name.upper()}: first 32 training images"
                print(f"wrote {save_contact_sheet(x, side, out, title)}")
        except DatasetError as exc:
            print(f"{name}: ERROR: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
