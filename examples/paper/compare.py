"""Print our tables beside the paper's: `python examples/paper/compare.py DATASET RESULTS.json…`.

RESULTS are the JSON tables `fgembed ensemble` writes (RUNS/NAME.json); each is compared with the
paper's table of the same name in examples/paper/expected.json (`table1.json` with Table I,
`table2.json` with Table II, …). The paper's rows come first, in its order, then the rows only we
ran; our numbers carry the 95 % bootstrap intervals `fgembed ensemble` computed, and each fusion
its paired gain over its best single member. `--members` names the backbones that stood in for
the paper's five, in the paper's order (dinov3, dinov2, convnext, openclip, siglip), when they
are not the reference five.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fgembed.analysis.report import compare

EXPECTED = Path(__file__).with_name("expected.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["cub", "inat"])
    parser.add_argument("results", nargs="+", type=Path, help="ensemble JSON tables, named after the paper's tables")
    parser.add_argument("--expected", type=Path, default=EXPECTED)
    parser.add_argument("--members", default=None, help="comma-separated stand-ins for the paper's five, in order")
    args = parser.parse_args()
    published = json.loads(args.expected.read_text())
    tables = published[args.dataset]
    ours = [m.strip() for m in args.members.split(",")] if args.members else published["members"]
    rename = dict(zip(published["members"], ours))
    for path in args.results:
        if path.stem not in tables:
            parser.error(f"{path} is named after no table of the paper's {args.dataset} results "
                         f"({', '.join(f'{t}.json' for t in tables)})")
        print(f"\n## {args.dataset} {path.stem}: ours beside the paper (percent; Δ = ours − paper; ours [lo, hi]: "
              "95 % bootstrap interval over the test images; gain: a fusion minus its best single member, paired)\n")
        print(compare(json.loads(path.read_text()), tables[path.stem], rename))


if __name__ == "__main__":
    main()
