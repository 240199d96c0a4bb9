"""Taxonomy data shipped with the package (built by tools/make_cub_taxonomy.py)."""
from __future__ import annotations

import csv
from functools import lru_cache
from importlib.resources import files

CUB_HIERARCHY_SOURCE = "cvjena/semantic-embeddings CUB-Hierarchy (MIT, B. Barz; 13 orders, 37 families)"


@lru_cache(maxsize=1)
def cub_taxonomy() -> dict[int, dict[str, str]]:
    """CUB class id (1..200) → {'scientific_name', 'order', 'family'}."""
    text = files("fgembed.datasets").joinpath("data/cub_taxonomy.tsv").read_text(encoding="utf-8")
    rows = csv.DictReader(text.splitlines(), delimiter="\t")
    return {int(r.pop("class_id")): r for r in rows}
