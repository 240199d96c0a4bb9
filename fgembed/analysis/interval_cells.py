"""How tables show bootstrap intervals and paired differences (`report` uses these).

A metric's interval follows its value, `84.10 [83.20, 85.00]` (percent); a fused row's paired
difference to the best single member of its subset reads `+1.30 [0.40, 2.20] p=0.004` (points);
CSV has them as plain numbers in `_ci_lo` / `_ci_hi` columns, JSON as metrics.json holds them.
A table computed without intervals (`--bootstrap 0`) shows none of them.
"""
from __future__ import annotations

from typing import Callable

DELTA = ("delta_f1", "Δ F1 (w) vs best member")   # the column: a fused row against its best single member
INTERVAL_METRICS = ("accuracy", "f1", "f1_macro", "mean_class_accuracy")  # the metrics with intervals


def interval_record(metrics: dict) -> dict:
    """A table record's balanced accuracy, and where the row has them its intervals
    (`<key>_ci`), paired differences (`delta_*`) and the `bootstrap` block."""
    out = {k: metrics.get(k) for k in ("mean_class_accuracy", "mean_class_accuracy_std")}
    out |= {k: v for k, v in metrics.items() if k.startswith("delta_")
            or (k.endswith("_ci") and k[:-3] in INTERVAL_METRICS)}
    if "bootstrap" in metrics:
        out["bootstrap"] = metrics["bootstrap"]
    return out


def interval_text(ci: list[float] | None) -> str:
    """` [lo, hi]` in percent, or nothing where there is no interval."""
    return "" if not ci else f" [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


def delta_cell(record: dict, key: str) -> str:
    """`+1.30 [0.40, 2.20] p=0.004`: a paired difference in points, its interval and p-value."""
    if record.get(key) is None:
        return "–"
    return f"{100 * record[key]:+.2f}{interval_text(record[f'{key}_ci'])} p={record[f'{key}_p']:.3f}"


def terminal_delta(record: dict) -> str:
    """`+1.30 p=0.004`, and under it the interval, `[0.40,2.20]` (80 columns); – for a single member."""
    key = DELTA[0]
    if record.get(key) is None:
        return "–"
    lo, hi = record[f"{key}_ci"]
    return f"{100 * record[key]:+.2f} p={record[f'{key}_p']:.3f}\n[{100 * lo:.2f},{100 * hi:.2f}]"


def interval_columns(records: list[dict]) -> dict[str, Callable[[dict], object]]:
    """CSV columns of the intervals and paired differences the rows have: `<key>_ci_lo`,
    `<key>_ci_hi`; `delta_<key>`, its `_ci_lo`, `_ci_hi`, `_p` and `_vs` (the member)."""
    def bound(key: str, end: int) -> Callable[[dict], object]:
        return lambda r: (r.get(key) or [None, None])[end]

    def plain(key: str) -> Callable[[dict], object]:
        return lambda r: r.get(key)

    columns: dict[str, Callable[[dict], object]] = {}
    for key in INTERVAL_METRICS:
        if any(r.get(f"{key}_ci") for r in records):
            columns |= {f"{key}_ci_lo": bound(f"{key}_ci", 0), f"{key}_ci_hi": bound(f"{key}_ci", 1)}
    for key in INTERVAL_METRICS:
        d = f"delta_{key}"
        if any(r.get(d) is not None for r in records):
            columns |= {d: plain(d), f"{d}_ci_lo": bound(f"{d}_ci", 0), f"{d}_ci_hi": bound(f"{d}_ci", 1),
                        f"{d}_p": plain(f"{d}_p"), f"{d}_vs": plain(f"{d}_vs")}
    return columns
