"""Score combinations of backbones: single heads, concat and sum fusions (each a trained run)
and late fusion (averaging the single runs' logits, seed by seed), ranked by weighted F1.

Combinations are written as tokens: `all` (every subset of two or more members), `pairs`,
`full` (all members together), `singles` (no fusion rows), or an explicit `a+b+c`; a
`strategy:` prefix limits a token to one strategy (`late:full`). Single-backbone rows are always
included: they are the baseline every fusion is read against, and late fusion needs them anyway.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FgembedError
from .fusion import STRATEGIES, fit_late_weights, late_fusion
from .metrics import classification_metrics
from .runs import Run, RunConfig, fit_run, summarise
from .store import FeatureStore

LATE_WEIGHTS = ("equal", "val")


@dataclass(frozen=True)
class Combination:
    strategy: str               # single, concat, sum or late
    members: tuple[str, ...]

    @property
    def name(self) -> str:
        return " + ".join(self.members)


@dataclass
class Entry:
    """One scored row of the table: the combination, its metrics (mean, `_std`) and its runs."""

    combination: Combination
    metrics: dict
    runs: list[Path]
    weights: list[float] | None = None


def plan(members: list[str], strategies: list[str], combinations: list[str]) -> list[Combination]:
    """The rows to score, singles first, each combination once, in a stable order."""
    if len(set(members)) != len(members):
        raise FgembedError(f"a member is named twice in {','.join(members)}")
    for strategy in strategies:
        if strategy not in STRATEGIES:
            raise FgembedError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    rows = [Combination("single", (m,)) for m in members]
    for token in combinations:
        prefix, sep, rest = token.partition(":")  # member names may hold ':' too (timm:test_vit)
        chosen, selector = ([prefix], rest) if sep and prefix in STRATEGIES else (strategies, token)
        for subset in _subsets(members, selector):
            rows += [Combination(s, subset) for s in chosen]
    return list(dict.fromkeys(rows))


def _subsets(members: list[str], selector: str) -> list[tuple[str, ...]]:
    if selector == "all":
        return [c for k in range(2, len(members) + 1) for c in itertools.combinations(members, k)]
    if selector == "pairs":
        return list(itertools.combinations(members, 2))
    if selector == "full":
        return [tuple(members)] if len(members) > 1 else []
    if selector == "singles":  # the single rows only (they are always in the plan)
        return []
    subset = tuple(selector.split("+"))
    unknown = [m for m in subset if m not in members]
    if unknown or len(subset) < 2:
        raise FgembedError(f"combination {selector!r} must be all, pairs, full, singles or two or more members "
                           f"joined by + ({', '.join(members)})")
    return [subset]


def score(store: FeatureStore, runs_dir: str | Path, combinations: list[Combination], base: RunConfig,
          device: str = "auto", force: bool = False, late_mode: str = "logits", late_weights: str = "equal",
          progress: bool = False) -> list[Entry]:
    """Train the runs the combinations need (reusing finished ones) and score them all."""
    if late_weights not in LATE_WEIGHTS:
        raise FgembedError(f"late weights must be one of {', '.join(LATE_WEIGHTS)}, got {late_weights!r}")
    runs: dict[tuple[str, tuple[str, ...]], Run] = {}

    def run_for(strategy: str, members: tuple[str, ...]) -> Run:
        if (strategy, members) not in runs:
            config = dataclasses.replace(base, features=members, fusion=strategy)
            runs[strategy, members] = fit_run(store, config, runs_dir, device=device, force=force, progress=progress)
        return runs[strategy, members]

    entries = []
    for combo in combinations:
        if combo.strategy == "late":
            singles = [run_for("single", (m,)) for m in combo.members]
            metrics, weights = _late(store, singles, base.level, late_mode, late_weights)
            entries.append(Entry(combo, metrics, [r.path for r in singles], weights))
        else:
            run = run_for(combo.strategy, combo.members)
            entries.append(Entry(combo, run.metrics, [run.path]))
    return sorted(entries, key=lambda e: -e.metrics["f1"])


def _late(store: FeatureStore, singles: list[Run], level: str | None, mode: str,
          weights_from: str) -> tuple[dict, list[float] | None]:
    """Fuse the members' logits seed by seed on the rows every member has; mean ± std over seeds."""
    manifests = {r.store["manifest_sha256"] for r in singles}
    if len(manifests) != 1:
        raise FgembedError("late fusion members were trained on different stores (different rows): "
                           + ", ".join(str(r.path) for r in singles))
    labels = store.labels(level=level).astype(np.int64)
    test = [r.logits("test") for r in singles]
    val = [r.logits("val") for r in singles]
    test_rows, test_logits = _common_rows(test)
    val_rows, val_logits = _common_rows(val)
    per_seed, all_weights = [], []
    for k in range(min(z.shape[0] for z in test_logits)):
        weights = None
        if weights_from == "val":
            weights = fit_late_weights([z[k] for z in val_logits], labels[val_rows], mode)
            all_weights.append(weights)
        fused = late_fusion([z[k] for z in test_logits], mode, weights)
        per_seed.append(classification_metrics(fused, labels[test_rows]))
    metrics = summarise(per_seed) | {"per_seed": per_seed, "n_test": len(test_rows),
                                     "seeds": singles[0].metrics["seeds"][:len(per_seed)]}
    mean_weights = np.mean(all_weights, axis=0).round(4).tolist() if all_weights else None
    return metrics, mean_weights


def _common_rows(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rows present in every member (a failed image drops out of its backbone's run only)."""
    common = parts[0][0]
    for rows, _ in parts[1:]:
        common = np.intersect1d(common, rows)
    return common, [logits[:, np.searchsorted(rows, common)] for rows, logits in parts]
