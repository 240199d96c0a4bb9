"""The ranked table as a terminal shows it (80 columns) and the chart's legend and title."""
from __future__ import annotations

import itertools

import pytest
from matplotlib.image import imread
from rich.console import Console

from fgembed.analysis.ensemble import Entry
from fgembed.analysis.plan import Combination
from fgembed.analysis.report import (
    bar_chart,
    member_keys,
    ranking_table,
    strategy_name,
)

FIVE = ("dinov3_vitl16", "dinov2_vitl14", "convnextv2_large", "openclip_vitl14", "siglip_vitl16_256")
METRICS = ("accuracy", "precision", "recall", "f1", "f1_macro", "top5")


def _entries(members=FIVE, seeds=(0, 1, 2), recall_is_accuracy=True) -> list[Entry]:
    """Every single and every late/concat/sum subset, ranked by F1 as `score` ranks them."""
    entries = []
    for k in range(1, len(members) + 1):
        for subset in itertools.combinations(members, k):
            for strategy in ("single",) if k == 1 else ("late", "concat", "sum"):
                f1 = 0.5 + 0.4 * len(entries) / 100
                metrics = {m: f1 for m in METRICS} | {f"{m}_std": 0.0123 for m in METRICS} | {"seeds": list(seeds)}
                if not recall_is_accuracy:
                    metrics["recall"] = f1 - 0.01
                entries.append(Entry(Combination(strategy, subset), metrics, []))
    return sorted(entries, key=lambda e: -e.metrics["f1"])


def _render(entries: list[Entry], width: int = 80) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    table, legend = ranking_table(entries)
    console.print(table)
    for line in legend:
        console.print(f"  {line}", highlight=False, markup=False)
    return console.export_text().splitlines()


@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)])
def test_every_row_names_its_members_at_80_columns(seeds):
    entries = _entries(seeds=seeds)
    lines = _render(entries)
    assert all(len(line) <= 80 for line in lines) and not any("…" in line for line in lines)
    keys = member_keys(entries)
    assert list(keys) == list(FIVE) and list(keys.values()) == list("ABCDE")  # the order the user listed them
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert len(rows) == len(entries) == 5 + 3 * 26
    for row, entry in zip(rows, entries):
        assert row[1] == entry.combination.strategy
        assert row[2] == "+".join(keys[m] for m in entry.combination.members)  # whole, never cut
        assert row[3] == (f"{100 * entry.metrics['accuracy']:.2f}" + ("±1.23" if len(seeds) > 1 else ""))
    for member, key in keys.items():
        assert f"  {key}  {member}" in lines  # the legend under the table


def test_recall_shown_only_when_it_differs_from_accuracy():
    header = lambda lines: next(line for line in lines if "Acc" in line)  # noqa: E731
    same = _render(_entries(members=FIVE[:2]))
    assert "R (w)" not in header(same) and any("recall equals accuracy" in line for line in same)
    differs = _render(_entries(members=FIVE[:2], recall_is_accuracy=False))
    assert "R (w)" in header(differs) and not any("recall equals accuracy" in line for line in differs)


def test_chart_has_a_legend_and_a_wrapped_title(tmp_path, monkeypatch):
    import matplotlib.axes

    seen = {}
    title, legend = matplotlib.axes.Axes.set_title, matplotlib.axes.Axes.legend
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, text, **kw: seen.setdefault("title", text) and title(self, text, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "legend",
                        lambda self, **kw: seen.setdefault("legend", [h.get_label() for h in kw["handles"]])
                        and legend(self, **kw))
    long_title = "iNat21 Table III: late, concat and sum fusions of the paper's five backbones, weighted F1 on test"
    entries = _entries(members=FIVE[:3])
    path = bar_chart(entries, tmp_path / "chart.png", long_title)
    assert imread(path).shape[1] == 9 * 120  # 9 in at 120 dpi
    assert max(len(line) for line in seen["title"].splitlines()) <= 60 and " ".join(seen["title"].split()) == long_title
    # one entry per strategy, best-ranked first
    assert seen["legend"] == list(dict.fromkeys(strategy_name(e.combination.strategy) for e in entries))
    assert len(seen["legend"]) == 4


def test_progress_bar_is_one_line_at_80_columns():
    """A long run label (`[` included) is cut with an ellipsis, not wrapped or read as markup."""
    from fgembed.progress import progress_bar

    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # not a tty: only the final state
    label = "concat timm:test_vit+timm:test_convnext+timm:test_resnet · mlp [lr 0.001] · seeds 0,1,2"
    with progress_bar(33, "ensemble", unit="run", console=console) as tick:
        tick(5, description=label)
        tick()
    (final,) = console.export_text().splitlines()
    assert len(final) <= 80 and final.startswith("concat timm:test") and "…" in final and "6/33" in final
