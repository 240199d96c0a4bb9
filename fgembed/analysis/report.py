"""Result tables (Markdown, CSV, LaTeX, JSON) and the ranking bar chart.

Precision, recall and F1 are weighted averages, as in the reference paper (whose recall equals
accuracy in every row); the headers say so, and macro F1 stands beside them. Numbers are
percentages; with several seeds a cell reads `mean ± std`, and with bootstrap intervals (`fgembed
ensemble --bootstrap N`, on by default) `84.10 [83.20, 85.00]`: the 95 % interval over the test
images; a fused row's `Δ F1 (w)` cell is its paired difference to the best single member of its
subset, `+1.30 [0.40, 2.20] p=0.004` (CSV: `_ci_lo` / `_ci_hi` columns; JSON: `_ci` lists and
`delta_*` keys, as metrics.json holds them). Rows of multi-level runs add an
accuracy column per taxonomy level and their mean (`Acc order`, …, `Avg acc`, the flamingo-or-bird paper's table),
read from the nested `levels.<level>.accuracy` keys (a dotted column key walks nested blocks),
then the consistency rate (percent) and the mistake severity (a mean LCA depth, not a percentage).
"""
from __future__ import annotations

import csv
import functools
import io
import json
import math
import string
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FgembedError
from ..plots import save_figure
from .interval_cells import DELTA, delta_cell, interval_columns, interval_record, interval_text, terminal_delta

if TYPE_CHECKING:  # tables only read entries: importing the report stays free of the training stack
    from rich.table import Table

    from .ensemble import Entry

FORMATS = ("md", "csv", "latex", "json")
METRICS = (("accuracy", "Accuracy"), ("precision", "Precision (w)"), ("recall", "Recall (w)"),
           ("f1", "F1 (w)"), ("f1_macro", "F1 (macro)"), ("top5", "Top-5"))
# late fusion and its forms are no embedding fusions: named here (name, colour)
LATE = {"late": ("late fusion", "#d62728"), "late-val": ("late fusion, val weights", "#ff9896"),
        "gated": ("gated late fusion", "#9467bd"),
        "distilled": ("distilled student", "#17becf")}  # a student of late fusion's targets (`fgembed distill`)


def strategy_name(strategy: str) -> str:
    """How tables name a row's strategy: a registered fusion's title, or a form of late fusion."""
    from ..classify.fusion import FUSIONS

    return LATE[strategy][0] if strategy in LATE else FUSIONS[strategy].title


def strategy_colour(strategy: str) -> str:
    from ..classify.fusion import FUSIONS

    return LATE[strategy][1] if strategy in LATE else FUSIONS[strategy].colour
FREQUENCY_METRICS = (("many", "Acc many"), ("medium", "Acc medium"), ("few", "Acc few"))  # --by-frequency
HIERARCHY_METRICS = (("consistency", "Consistency"), ("mistake_severity", "Mistake depth"))  # with levels
NUMBERS = ("gmacs", "mistake_severity")  # cells printed as numbers, not percentages
TERMINAL_METRICS = (("accuracy", "Acc"), ("precision", "P (w)"), ("recall", "R (w)"), ("f1", "F1 (w)"),
                    ("f1_macro", "F1 (m)"), ("top5", "Top-5"))


def entry_record(entry: Entry) -> dict:
    """One row as plain data: the JSON format, and what `compare` reads back."""
    combo = entry.combination
    return {"strategy": combo.strategy, "members": list(combo.members), "key": row_key(combo.strategy, combo.members),
            "seeds": entry.metrics.get("seeds"), "n_test": entry.metrics.get("n_test"),
            **{k: entry.metrics[k] for k, _ in METRICS}, **{f"{k}_std": entry.metrics.get(f"{k}_std", 0.0)
                                                            for k, _ in METRICS},
            "late_weights": entry.weights, "runs": [str(p) for p in entry.runs],
            **_frequency_record(entry.metrics.get("by_frequency")),
            "gmacs": entry.metrics.get("gmacs"), "throughput": entry.metrics.get("throughput"),
            **{k: entry.metrics.get(k) for k in ("level_order", "levels", "avg_accuracy", "avg_accuracy_std",
                                                 "consistency", "consistency_std", "mistake_severity",
                                                 "mistake_severity_std")},
            **interval_record(entry.metrics)}


def value(record: dict, key: str):
    """`record[key]`, where a dotted key (`levels.order.accuracy`) walks nested blocks; None when absent."""
    return functools.reduce(lambda block, part: (block or {}).get(part), key.split("."), record)


def level_columns(records: list[dict], level_names: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(record key, header) of per-level accuracy, their mean, the consistency and the mistake
    severity, when a row is of a multi-level run (late fusion of multi-level runs included); []
    otherwise. `level_names` renames levels in headers (the fine level `label` as the user named
    it, e.g. `species`)."""
    order = next((r["level_order"] for r in records if r.get("level_order")), None)
    if not order:
        return []
    names = level_names or {}
    return [(f"levels.{lv}.accuracy", f"Acc {names.get(lv, lv)}") for lv in order] + [("avg_accuracy", "Avg acc"),
                                                                                       *HIERARCHY_METRICS]


def _frequency_record(block: dict | None) -> dict:
    """`acc_many`, `acc_many_std`, … from a row's `by_frequency` block (None where a row has
    none, e.g. a run written before by_frequency was recorded)."""
    out = {}
    for name, _ in FREQUENCY_METRICS:
        entry = (block or {}).get(name, {})
        out[f"acc_{name}"], out[f"acc_{name}_std"] = entry.get("accuracy"), entry.get("accuracy_std", 0.0)
        out[f"n_classes_{name}"] = entry.get("n_classes")
    return out


def extra_columns(by_frequency: bool = False, cost: bool = False) -> list[tuple[str, str]]:
    """(record key, header) of the optional columns: many/medium/few accuracy, GMACs per image."""
    return ([(f"acc_{k}", title) for k, title in FREQUENCY_METRICS] if by_frequency else []) + \
        ([("gmacs", "GMACs")] if cost else [])


def combine_costs(costs: list[dict | None]) -> dict:
    """An ensemble's inference cost per image from its members' `bench.read_cost` records: GMACs
    add up (every member runs on every image); images/s is 1 / Σ 1/throughput_i (members run one
    after another) on a device × precision every member was measured at. None where unknown."""
    if not costs or any(c is None for c in costs):
        return {"gmacs": None, "throughput": None}
    shared = set.intersection(*(set(c.get("measurements", {})) for c in costs))
    key = min(shared) if shared else None
    rates = [c["measurements"][key].get("throughput") for c in costs] if key else [None]
    return {"gmacs": float(sum(c["gmacs"] for c in costs)),
            "throughput": None if None in rates else 1 / sum(1 / r for r in rates), "measured_on": key}


def pareto_front(cost: list[float], score: list[float]) -> list[bool]:
    """Non-dominated points when lower cost and higher score are better: no other point is at
    most as costly and at least as good, and strictly better in one (equal points all stay)."""
    pts = list(zip(cost, score))
    return [not any(c2 <= c and s2 >= s and (c2 < c or s2 > s) for c2, s2 in pts) for c, s in pts]


def row_key(strategy: str, members: list[str] | tuple[str, ...]) -> str:
    """`late:a+b`: how rows are named in expected-results files."""
    return f"{strategy}:{'+'.join(members)}"


def cell(record: dict, key: str) -> str:
    """A metric as a percentage, `mean ± std` when the row has several seeds, then its interval
    `[lo, hi]` where it has one; a paired difference (`delta_*`) as `+d [lo, hi] p=…`; GMACs and
    mistake severity (`NUMBERS`) as numbers; – where the row has no value."""
    if key.startswith("delta_"):
        return delta_cell(record, key)
    text = _point(record, key)
    return text + interval_text(record.get(f"{key}_ci")) if text != "–" else text


def _point(record: dict, key: str) -> str:
    number = value(record, key)
    if number is None or (isinstance(number, float) and math.isnan(number)):  # missing, or NaN (an empty bin)
        return "–"
    if key == "gmacs":
        return f"{number:.2f}"
    scale = 1 if key in NUMBERS else 100
    mean, std = scale * number, scale * (value(record, f"{key}_std") or 0.0)
    return f"{mean:.2f} ± {std:.2f}" if record.get("seeds") and len(record["seeds"]) > 1 else f"{mean:.2f}"


def format_table(entries: list[Entry], fmt: str, extra: list[tuple[str, str]] = (),
                 level_names: dict[str, str] | None = None) -> str:
    """The ranked table; `extra` adds optional columns (`extra_columns`: by-frequency accuracy, GMACs).
    Per-level accuracy columns come with rows of multi-level runs (`level_columns`, headers renamed
    by `level_names`)."""
    if fmt not in FORMATS:
        raise FgembedError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    records = [entry_record(e) for e in entries]
    if fmt == "json":
        return json.dumps(records, indent=2)
    delta = [DELTA] if any(r.get(DELTA[0]) is not None for r in records) else []
    columns = [*METRICS, *delta, *level_columns(records, level_names), *extra]
    header = ["#", "Method", "Members", *(title for _, title in columns)]
    rows = [[str(i), strategy_name(r["strategy"]), " + ".join(r["members"]), *(cell(r, k) for k, _ in columns)]
            for i, r in enumerate(records, 1)]
    if fmt == "csv":
        keys = [k for k, _ in columns if k != DELTA[0]]
        stds = [f"{k}_std" for k in keys if k != "gmacs"]
        intervals = interval_columns(records)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["rank", "strategy", "members", *keys, *stds, *intervals])
        for i, r in enumerate(records, 1):
            writer.writerow([i, r["strategy"], "+".join(r["members"]), *(value(r, k) for k in keys),
                             *(value(r, k) for k in stds), *(get(r) for get in intervals.values())])
        return buffer.getvalue()
    if fmt == "latex":
        escape = lambda s: s.replace("_", r"\_").replace("±", r"$\pm$").replace("#", r"\#").replace(  # noqa: E731
            "Δ", r"$\Delta$")
        lines = [r"\begin{tabular}{rll" + "r" * len(columns) + "}", r"\toprule",
                 " & ".join(escape(h) for h in header) + r" \\", r"\midrule"]
        lines += [" & ".join(escape(c) for c in row) + r" \\" for row in rows]
        return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i == 0 or i > 2 else "---"
                                                            for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def member_keys(entries: list[Entry]) -> dict[str, str]:
    """A short key per member (A, B, …) for narrow views, in the order the user listed the members
    (the largest combination keeps it; rows themselves are ranked by F1)."""
    order: dict[str, None] = {}
    for entry in sorted(entries, key=lambda e: -len(e.combination.members)):
        order.update(dict.fromkeys(entry.combination.members))
    letters = string.ascii_uppercase
    return {m: letters[i] if i < len(letters) else f"M{i + 1}" for i, m in enumerate(order)}


def ranking_table(entries: list[Entry]) -> tuple[Table, list[str]]:
    """The ranked table for a terminal and its legend lines.

    Members are short keys (`A+B`) explained under the table, so every row stays identifiable at
    80 columns; weighted recall is left out when it equals accuracy in every row (it always does
    for single-label data; the files keep it). With bootstrap intervals each cell takes a second
    line, `[lo,hi]` to one decimal, and fused rows a `ΔF1` column (the paired difference to the
    best single member); top-5 then makes room for it (the files keep it).
    """
    from rich import box
    from rich.table import Table

    records = [entry_record(e) for e in entries]
    keys = member_keys(entries)
    delta = any(r.get(DELTA[0]) is not None for r in records)
    metrics = [(k, title) for k, title in TERMINAL_METRICS
               if (k != "recall" or any(abs(r["recall"] - r["accuracy"]) > 1e-9 for r in records))
               and (k != "top5" or not delta)]
    table = Table(box=box.SIMPLE_HEAD, padding=0, show_edge=False)  # one space between columns: 5 × 3 seeds fit in 80
    table.add_column("#", justify="right")
    table.add_column("fusion")
    table.add_column("members", no_wrap=True)
    for _, title in [*metrics, *([(DELTA[0], "ΔF1 (w)")] if delta else [])]:
        table.add_column(title, justify="right", no_wrap=True)
    for i, r in enumerate(records, 1):
        table.add_row(str(i), r["strategy"], "+".join(keys[m] for m in r["members"]),
                      *(_terminal_cell(r, k) for k, _ in metrics), *([terminal_delta(r)] if delta else []))
    legend = [f"{key}  {member}" for member, key in keys.items()]
    legend.append("percent on the test split; (w) weighted, (m) macro")
    if all(k != "recall" for k, _ in metrics):
        legend.append("weighted recall equals accuracy: left out here, kept in the files")
    if (block := next((r["bootstrap"] for r in records if r.get("bootstrap")), None)) is not None:
        legend.append(f"[lo,hi]: {100 * block['confidence']:g} % bootstrap interval over the test images "
                      f"({block['n_resamples']} resamples)")
    if delta:
        legend += ["ΔF1: a fusion minus its best single member, paired on the same resamples;",
                   "     its interval and two-sided p-value (top-5: in the files)"]
    return table, legend


def _terminal_cell(record: dict, key: str) -> str:
    """`84.10±0.30`, and under it the interval to one decimal, `[83.2,85.0]`."""
    text = _point(record, key).replace(" ± ", "±")
    ci = record.get(f"{key}_ci")
    return text if not ci or text == "–" else f"{text}\n[{100 * ci[0]:.1f},{100 * ci[1]:.1f}]"


def bar_chart(entries: list[Entry], path: str | Path, title: str = "weighted F1 on the test split") -> Path:
    """Horizontal bars of F1, best on top, coloured by strategy with a legend; error bars are the
    95 % bootstrap intervals where every row has one, else the seed std; long titles and row
    labels are wrapped to the figure's width."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    records = [entry_record(e) for e in entries][::-1]
    labels = ["\n".join(textwrap.wrap(" + ".join(r["members"]), 48, break_on_hyphens=False)) for r in records]
    lines = sum(label.count("\n") + 1 for label in labels)
    fig, ax = plt.subplots(figsize=(9, 0.3 * lines + 0.12 * len(records) + 1.6))
    values = [100 * r["f1"] for r in records]
    intervals = all(r.get("f1_ci") for r in records)
    # below / above each bar's end (at least 0: a percentile interval need not hold its point)
    errors = [[max(0.0, 100 * (r["f1"] - r["f1_ci"][0])) for r in records],
              [max(0.0, 100 * (r["f1_ci"][1] - r["f1"])) for r in records]] if intervals else \
        [100 * r["f1_std"] for r in records]
    ax.barh(range(len(records)), values, xerr=errors, color=[strategy_colour(r["strategy"]) for r in records])
    ax.set_yticks(range(len(records)), labels, fontsize=8)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
    ax.set_xlim(0.0, min(100.0, max(values) + 5))  # from 0: a bar's length is its value
    ax.set_xlabel("F1 (weighted, %)" + (", 95 % bootstrap intervals" if intervals else ""))
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=10)
    present = dict.fromkeys(r["strategy"] for r in records[::-1])
    ax.legend(handles=[Patch(color=strategy_colour(s), label=strategy_name(s)) for s in present],
              loc="lower right", fontsize=8, framealpha=0.9)
    return save_figure(fig, path)


def compare(records: list[dict], expected: dict[str, dict], rename: dict[str, str] | None = None) -> str:
    """A Markdown table of our rows beside a published table's: the paper's rows first, in the
    paper's order, then the rows only we ran (ranked as ours are).

    `expected` maps row keys to the paper's values as fractions (plus an optional `label`, the row
    as printed); the metrics compared are the ones it has. Our numbers and the paper's print as
    percent (the paper's at the precision it printed), ours with its bootstrap interval where it has
    one; Δ is ours − paper in points. With intervals a last column gives each fused row's paired
    gain over the best single member of its subset (weighted F1): the question a single number
    leaves open, whether a fusion's gain is more than test-set noise. `rename` maps the paper's
    backbone names to the ones we ran in their place.
    """
    rename = rename or {}

    def our_key(key: str) -> str:
        strategy, _, members = key.partition(":")
        return row_key(strategy, [rename.get(m, m) for m in members.split("+")])

    metrics = list(dict.fromkeys(k for row in expected.values() for k in row if k != "label"))
    ours = {r["key"]: r for r in records}
    gains = any(r.get(DELTA[0]) is not None for r in records)
    header = ["Paper row", "Our row", *(f"{m} {side}" for m in metrics for side in ("ours", "paper", "Δ")),
              *(["f1 gain vs best member (ours)"] if gains else [])]
    lines = ["| " + " | ".join(header) + " |", "|---|---" + "|---:" * (len(header) - 2) + "|"]
    paper_keys = {our_key(k): k for k in expected}
    for key in [*paper_keys, *(k for k in ours if k not in paper_keys)]:
        mine, theirs = ours.get(key), expected.get(paper_keys.get(key), {})
        row = [theirs.get("label", paper_keys.get(key, "(not in the paper)")), key]
        for m in metrics:
            a, b = (100 * mine[m] if mine else None), (100 * theirs[m] if theirs.get(m) is not None else None)
            row += [cell(mine, m) if mine else "–", "–" if b is None else f"{b:.1f}",
                    f"{a - b:+.2f}" if a is not None and b is not None else "–"]
        if gains:
            row.append(delta_cell(mine, DELTA[0]) if mine else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_report(entries: list[Entry], directory: str | Path, name: str = "ensemble",
                 title: str = "weighted F1 on the test split", extra: list[tuple[str, str]] = (),
                 level_names: dict[str, str] | None = None) -> list[Path]:
    """The table in every format (`NAME.md/.csv/.tex/.json`), the bar chart `NAME.png`, and with
    a GMACs column the accuracy-versus-cost plot `NAME-pareto.png`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, fmt in (("md", "md"), ("csv", "csv"), ("tex", "latex"), ("json", "json")):
        paths.append(directory / f"{name}.{ext}")
        paths[-1].write_text(format_table(entries, fmt, extra, level_names))
    paths.append(bar_chart(entries, directory / f"{name}.png", title))
    if any(k == "gmacs" for k, _ in extra) and any(e.metrics.get("gmacs") is not None for e in entries):
        paths.append(pareto_plot(entries, directory / f"{name}-pareto.png"))
    return paths


def pareto_plot(entries: list[Entry], path: str | Path) -> Path:
    """Weighted F1 against inference cost per image (the accuracy-vs-cost study's question asked of ensembles): GMACs
    summed over members, and a second panel in images/s where every member's throughput is known;
    the Pareto front (cheaper and better than every other row) joined and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    records = [r for r in (entry_record(e) for e in entries) if r["gmacs"] is not None]
    panels = [("gmacs", "GMACs per image (sum over members)", 1)]
    if any(r["throughput"] is not None for r in records):
        panels.append(("throughput", "images/s (members in sequence)", -1))  # faster is cheaper
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, (key, label, sign) in zip(axes[0], panels):
        rows = [r for r in records if r[key] is not None]
        x, f1 = [r[key] for r in rows], [100 * r["f1"] for r in rows]
        front = pareto_front([sign * v for v in x], f1)
        ax.scatter(x, f1, c=[strategy_colour(r["strategy"]) for r in rows], s=24, alpha=0.6)
        best = sorted((v, f, r) for v, f, r, on in zip(x, f1, rows, front) if on)
        ax.plot([b[0] for b in best], [b[1] for b in best], "k--", lw=1, label="Pareto front")
        for v, f, r in best:
            ax.annotate(f"{r['strategy']}:{'+'.join(r['members'])}", (v, f), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor log labels collide
        ax.set_xlabel(label)
        ax.set_ylabel("F1 (weighted, %)")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
