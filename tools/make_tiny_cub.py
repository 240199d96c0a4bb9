"""Write a small generated dataset in CUB_200_2011's on-disk format, to run `make hierarchy-cub`
end to end without the real images: `python tools/make_tiny_cub.py DIR [--per-class N]`.

It uses the test suite's generators (fgembed.synthetic's images and CUB writer), so the folder is
the one the tests read: six real CUB class ids, hence real orders and families from the packaged
taxonomy. Prints the dataset root to pass as CUB_ROOT.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fgembed.synthetic import generate, write_cub


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="folder to write (CUB_200_2011/ is created inside)")
    parser.add_argument("--per-class", type=int, default=20, help="images per class (six classes)")
    args = parser.parse_args()
    args.target.mkdir(parents=True, exist_ok=True)
    records = generate(args.target, groups=3, classes_per_group=2, per_class=args.per_class, size=(80, 60))
    print(write_cub(args.target, records))


if __name__ == "__main__":
    main()
