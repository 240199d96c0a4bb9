"""Build fgembed/datasets/data/cub_taxonomy.tsv from ../shared/data/cub_hierarchy/.

The source (cvjena/semantic-embeddings, MIT, B. Barz) gives each CUB class a scientific name and
an indented order/family/genus/species tree; this joins them into one row per class so the
package needs no parsing at run time. Usage: python tools/make_cub_taxonomy.py [SOURCE_DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parent.parent / "shared" / "data" / "cub_hierarchy"
TARGET = HERE.parent / "fgembed" / "datasets" / "data" / "cub_taxonomy.tsv"
DEPTH = {2: "order", 4: "family", 6: "genus", 8: "species"}


def build(source: Path) -> str:
    names = dict(
        line.split(maxsplit=1)
        for line in (source / "classes_wikispecies.txt").read_text().splitlines()
        if line.strip()
    )
    where: dict[str, tuple[str, str]] = {}  # genus or species → (order, family)
    order = family = ""
    for line in (source / "hierarchy_flat.txt").read_text().splitlines():
        dashes = len(line) - len(line.lstrip("-"))
        if dashes not in DEPTH:
            continue
        name = line[dashes:].strip()
        level = DEPTH[dashes]
        if level == "order":
            order = name
        elif level == "family":
            family = name
        else:
            where[name] = (order, family)
    rows = ["class_id\tscientific_name\torder\tfamily"]
    for class_id in sorted(names, key=int):
        order, family = where[names[class_id].strip()]
        rows.append(f"{class_id}\t{names[class_id].strip()}\t{order}\t{family}")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE
    TARGET.write_text(build(source))
    print(f"wrote {TARGET}")
