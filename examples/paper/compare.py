"""Print our tables beside the paper's: `python examples/paper/compare.py DATASET RESULTS.json… `.

RESULTS are the JSON tables `fgembed ensemble` writes (RUNS/NAME.json); the paper's numbers
come from examples/paper/expected.json (nulls print as –).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fgembed.report import compare

EXPECTED = Path(__file__).with_name("expected.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["cub", "inat"])
    parser.add_argument("results", nargs="+", type=Path, help="ensemble JSON tables")
    parser.add_argument("--expected", type=Path, default=EXPECTED)
    args = parser.parse_args()
    records = [r for path in args.results for r in json.loads(path.read_text())]
    tables = json.loads(args.expected.read_text())[args.dataset]
    for name, expected in tables.items():
        print(f"\n## {args.dataset} {name}: ours beside the paper (percent)\n")
        print(compare(records, expected, ("accuracy", "precision", "recall", "f1")))
    missing = sum(v is None for table in tables.values() for row in table.values() for v in row.values())
    if missing:
        print(f"({missing} of the paper's numbers are not in {args.expected} yet: shown as –)")


if __name__ == "__main__":
    main()
