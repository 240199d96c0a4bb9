"""Result tables (Markdown, CSV, LaTeX, JSON) and the ranking bar chart.

Precision, recall and F1 are weighted averages, as in the reference paper (whose recall equals
accuracy in every row); the headers say so, and macro F1 stands beside them. Numbers are
percentages; with several seeds a cell reads `mean ± std`.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .ensemble import Entry
from .errors import FgembedError

FORMATS = ("md", "csv", "latex", "json")
METRICS = (("accuracy", "Accuracy"), ("precision", "Precision (w)"), ("recall", "Recall (w)"),
           ("f1", "F1 (w)"), ("f1_macro", "F1 (macro)"), ("top5", "Top-5"))
STRATEGY_NAMES = {"single": "single", "concat": "concat", "sum": "sum", "late": "late fusion"}


def entry_record(entry: Entry) -> dict:
    """One row as plain data: the JSON format, and what `compare` reads back."""
    combo = entry.combination
    return {"strategy": combo.strategy, "members": list(combo.members), "key": row_key(combo.strategy, combo.members),
            "seeds": entry.metrics.get("seeds"), "n_test": entry.metrics.get("n_test"),
            **{k: entry.metrics[k] for k, _ in METRICS}, **{f"{k}_std": entry.metrics.get(f"{k}_std", 0.0)
                                                            for k, _ in METRICS},
            "late_weights": entry.weights, "runs": [str(p) for p in entry.runs]}


def row_key(strategy: str, members: list[str] | tuple[str, ...]) -> str:
    """`late:a+b`: how rows are named in expected-results files."""
    return f"{strategy}:{'+'.join(members)}"


def cell(record: dict, key: str) -> str:
    """A metric as a percentage, `mean ± std` when the row has several seeds."""
    value, std = 100 * record[key], 100 * record[f"{key}_std"]
    return f"{value:.2f} ± {std:.2f}" if record.get("seeds") and len(record["seeds"]) > 1 else f"{value:.2f}"


def format_table(entries: list[Entry], fmt: str) -> str:
    if fmt not in FORMATS:
        raise FgembedError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    records = [entry_record(e) for e in entries]
    if fmt == "json":
        return json.dumps(records, indent=2)
    header = ["#", "Method", "Members", *(title for _, title in METRICS)]
    rows = [[str(i), STRATEGY_NAMES[r["strategy"]], " + ".join(r["members"]), *(cell(r, k) for k, _ in METRICS)]
            for i, r in enumerate(records, 1)]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["rank", "strategy", "members", *(k for k, _ in METRICS), *(f"{k}_std" for k, _ in METRICS)])
        for i, r in enumerate(records, 1):
            writer.writerow([i, r["strategy"], "+".join(r["members"]), *(r[k] for k, _ in METRICS),
                             *(r[f"{k}_std"] for k, _ in METRICS)])
        return buffer.getvalue()
    if fmt == "latex":
        escape = lambda s: s.replace("_", r"\_").replace("±", r"$\pm$").replace("#", r"\#")  # noqa: E731
        lines = [r"\begin{tabular}{rll" + "r" * len(METRICS) + "}", r"\toprule",
                 " & ".join(escape(h) for h in header) + r" \\", r"\midrule"]
        lines += [" & ".join(escape(c) for c in row) + r" \\" for row in rows]
        return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i == 0 or i > 2 else "---"
                                                            for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def bar_chart(entries: list[Entry], path: str | Path, title: str = "weighted F1 on the test split") -> Path:
    """Horizontal bars of F1 (with the seed std as error bars), best on top, coloured by strategy."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    records = [entry_record(e) for e in entries][::-1]
    colours = {"single": "#7f7f7f", "concat": "#1f77b4", "sum": "#2ca02c", "late": "#d62728"}
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(records) + 1.2))
    values = [100 * r["f1"] for r in records]
    ax.barh(range(len(records)), values, xerr=[100 * r["f1_std"] for r in records],
            color=[colours[r["strategy"]] for r in records])
    ax.set_yticks(range(len(records)), [f"{STRATEGY_NAMES[r['strategy']]}: {' + '.join(r['members'])}"
                                        for r in records], fontsize=8)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
    low = min(values)
    ax.set_xlim(max(0.0, low - 10), min(100.0, max(values) + 5))
    ax.set_xlabel("F1 (weighted, %)")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(records: list[dict], expected: dict[str, dict], metrics: tuple[str, ...] = ("accuracy", "f1")) -> str:
    """A Markdown table of our numbers beside a published table's (`expected` maps row keys to
    {metric: percent}; a missing or null value prints as –)."""
    ours = {r["key"]: r for r in records}
    header = ["Row", *(f"{m} ours" for m in metrics), *(f"{m} paper" for m in metrics), *(f"Δ {m}" for m in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for key, theirs in expected.items():
        mine = ours.get(key)
        a = [100 * mine[m] if mine else None for m in metrics]
        b = [theirs.get(m) for m in metrics]
        delta = [x - y if x is not None and y is not None else None for x, y in zip(a, b)]
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append("| " + " | ".join([key, *map(fmt, a), *map(fmt, b), *map(fmt, delta)]) + " |")
    return "\n".join(lines) + "\n"


def write_report(entries: list[Entry], directory: str | Path, name: str = "ensemble",
                 title: str = "weighted F1 on the test split") -> list[Path]:
    """The table in every format (`NAME.md/.csv/.tex/.json`) and the bar chart `NAME.png`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, fmt in (("md", "md"), ("csv", "csv"), ("tex", "latex"), ("json", "json")):
        paths.append(directory / f"{name}.{ext}")
        paths[-1].write_text(format_table(entries, fmt))
    return paths + [bar_chart(entries, directory / f"{name}.png", title)]
