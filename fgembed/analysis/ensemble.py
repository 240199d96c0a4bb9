"""Score combinations of backbones: single heads, concat and sum fusions (each a trained run)
and late fusion (averaging the single runs' logits, seed by seed), ranked by weighted F1.

Combinations are written as tokens: `all` (every subset of two or more members), `pairs`,
`full` (all members together), `singles` (no fusion rows), or an explicit `a+b+c`; a
`strategy:` prefix limits a token to one strategy (`late:full`). Single-backbone rows are always
included: they are the baseline every fusion is read against, and late fusion needs them anyway.

Late fusion is streamed: every requested subset is scored in one pass over row blocks of the
test split — each member's float16 logits read once per seed per block, widened to float32 for
that block only, and each subset's per-class counts accumulated (`metrics.MetricCounts`). Peak
memory depends on the block and the number of classes, not on the rows or the subsets.
`late_weights="val"` fits each subset's weights on a bounded, seeded sample of validation rows.

A late-fusion row carries what a trained run's metrics.json does. `by_frequency` (many / medium /
few-shot accuracy, `longtail`) comes from the same per-class counts, binned by the training rows
the subset's members share (as a concat run of them would train on). Multi-level runs
(`--levels order,family,species`) are fused level by level in the same pass — every level's
logits of a block (`logits.zarr/<level>/{val,test}`, weights fitted per level) fused together —
so each row's fused predictions at all levels are at hand at once: besides `levels.<level>.*` and
`avg_accuracy`, the row gets `consistency` and `mistake_severity` (`hierarchy_metrics`), summed
row by row block by block; its top-level keys are the finest level's. Members must share their
levels; a mix of single-level members (e.g. `member@knn`, which predicts the finest level only)
and multi-level ones fuses that finest level alone, with one warning — no member is refused for
lacking levels.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..classify.fusion import LATE_MODES, STRATEGIES, fit_late_weights
from ..classify.hierarchy_metrics import Taxonomy, consistent_rows, lca_depth
from ..classify.longtail import SHOT_BINS, frequency_bins
from ..classify.metrics import MetricCounts
from ..classify.runs import Run, RunConfig, check_levels, finished, fit_run, run_path, same_rows, summarise
from ..classify.views import build_view, level_key
from ..datasets.table import SPLIT_NAMES
from ..errors import FgembedError
from ..images import FAILED
from ..progress import progress_bar
from ..store import FeatureStore

LATE_WEIGHTS = ("equal", "val")
BLOCK_ELEMENTS = 2 ** 25      # float32 logits held per block, over all members (128 MB)
WEIGHT_ELEMENTS = 2 ** 26     # float32 logits of the validation sample, over a subset's members
WEIGHT_ROWS = 20_000          # at most this many validation rows fit the late weights


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


def split_member(member: str) -> tuple[str, str | None]:
    """`backbone@head` → (backbone, head); a plain backbone name → (name, None): the base head."""
    name, sep, head = member.rpartition("@")
    return (name, head) if sep and name and head else (member, None)


def run_config(base: RunConfig, strategy: str, members: tuple[str, ...]) -> RunConfig:
    """`base` with these members fused this way (its view's l2 / projection / row selection kept).
    A single member may name its own head (`dinov2_vitl14@knn`, `openclip_vitl14@zeroshot`)."""
    fusion = "single" if strategy in ("single", "late") else strategy
    names, heads = zip(*(split_member(m) for m in members))
    config = base
    if any(heads):
        if len(members) > 1:
            raise FgembedError(f"{strategy} fusion trains one head on all its members: member@head goes with "
                               f"late fusion only (--strategies late), got {' + '.join(members)}")
        # a named head predicts one level: with --levels, the finest (late fusion then scores that level)
        one_level = {"levels": (), "level": base.head.levels[-1]} if base.head.levels else {}
        config = dataclasses.replace(base, head=dataclasses.replace(base.head, head=heads[0], **one_level))
    view = dataclasses.replace(base.view, features=names, fusion=fusion if len(members) > 1 else "single")
    return dataclasses.replace(config, view=view)


def score(store: FeatureStore, runs_dir: str | Path, combinations: list[Combination], base: RunConfig,
          device: str = "auto", force: bool = False, late_mode: str = "logits", late_weights: str = "equal",
          progress: bool = False) -> list[Entry]:
    """Train the runs the combinations need (reusing finished ones) and score them all.

    `base` gives the head and the view settings of every run (build its view with fusion `sum`
    to carry l2 / projection settings); its features are replaced per combination."""
    if late_weights not in LATE_WEIGHTS:
        raise FgembedError(f"late weights must be one of {', '.join(LATE_WEIGHTS)}, got {late_weights!r}")
    if late_mode not in LATE_MODES:
        raise FgembedError(f"late fusion mode must be one of {', '.join(LATE_MODES)}, got {late_mode!r}")
    check_levels(store, base)
    needed: dict[tuple[str, tuple[str, ...]], RunConfig] = {}
    for combo in combinations:
        if combo.strategy == "late":
            needed.update({("single", (m,)): run_config(base, "single", (m,)) for m in combo.members})
        else:
            needed[combo.strategy, combo.members] = run_config(base, combo.strategy, combo.members)
    runs = _train_all(store, runs_dir, needed, device, force, progress)
    entries, late = [], []
    for combo in combinations:
        if combo.strategy == "late":
            late.append(combo)
        else:
            run = runs[combo.strategy, combo.members]
            entries.append(Entry(combo, run.metrics, [run.path]))
    if late:
        singles = {m: runs["single", (m,)] for combo in late for m in combo.members}
        if len({run.config.head.head for run in singles.values()}) > 1 and late_mode != "proba":
            late_mode = "proba"  # heads whose scores differ in scale (CONVENTIONS): average probabilities
            warnings.warn("late fusion of different heads averages probabilities (--late-mode proba)")
        entries += late_entries(store, singles, late, base.head.level, late_mode, late_weights)
    return sorted(entries, key=lambda e: -e.metrics["f1"])


def _train_all(store: FeatureStore, runs_dir: str | Path, needed: dict, device: str, force: bool,
               progress: bool) -> dict:
    """Reuse finished runs; train the rest under one progress bar (epochs of every run to train),
    building each view once for the runs that share it."""
    runs, todo = {}, []
    for key, config in needed.items():
        path, _ = run_path(store, config, runs_dir)
        run = None if force else finished(path)
        if run is None:
            todo.append((key, config))
        else:
            runs[key] = run
    todo.sort(key=lambda item: repr(item[1].view))
    total = sum(config.head.total_epochs for _, config in todo)
    with progress_bar(total, f"training {len(todo)} runs", enabled=progress, unit="epoch") as tick:
        view = None
        for i, (key, config) in enumerate(todo, 1):
            what = f"run {i}/{len(todo)} {config.label}"  # the bar counts every run's epochs: say which
            tick(0, description=f"{what} (reading)")
            if view is None or view.config != config.view:
                view = None  # free the previous view before reading the next
                view = build_view(store, config.view, device=device)
            tick(0, description=what)
            runs[key] = fit_run(store, config, runs_dir, device=device, force=True, view=view,
                                tick=lambda n=1, description=None: tick(n))
        tick(0, description=f"trained {len(todo)} run{'s' * (len(todo) != 1)}")
    return runs


# ---- streamed late fusion ---------------------------------------------------------------------------
@dataclass
class LogitSource:
    """One member's logits of a split: sorted store `rows` and `array` [seeds, rows, classes]
    (a zarr array or anything numpy-indexable, e.g. float16 or float32 numpy)."""

    rows: np.ndarray
    array: Any

    @classmethod
    def of(cls, run: Run, split: str, group_name: str | None = None) -> LogitSource:
        """The split's logits at the root of `logits.zarr`, or in its `group_name` (a level of a
        multi-level run)."""
        import zarr
        group = zarr.open_group(run.path / "logits.zarr", mode="r")
        return cls(group[f"{split}_rows"][:], group[f"{group_name}/{split}" if group_name else split])

    @property
    def n_seeds(self) -> int:
        return int(self.array.shape[0])

    def take(self, seed: int, positions: np.ndarray) -> np.ndarray:
        if hasattr(self.array, "get_orthogonal_selection"):
            return self.array.get_orthogonal_selection((seed, positions, slice(None)))
        return np.asarray(self.array[seed][positions])


@dataclass(frozen=True)
class FusedLevel:
    """A level late fusion scores: its name (a taxonomy level, `label` for the fine one) and, per
    member, the `logits.zarr` group that holds its logits (None: the root, a single-level run)."""

    name: str
    groups: tuple[str | None, ...]


def fused_levels(singles: dict[str, Run], level: str | None) -> tuple[list[FusedLevel], bool]:
    """The levels to fuse, coarse → fine, and whether rows get per-level metrics.

    Single-level members: their one level (`level`, None = fine). Multi-level members must share
    --levels: every level is fused. A mix fuses the multi-level members' finest level only, with a
    warning (a single-level member predicts no coarser level); it must be the level the
    single-level members were trained on."""
    names = list(singles)
    levels = {m: singles[m].config.head.levels for m in names}
    distinct = list(dict.fromkeys(lv for lv in levels.values() if lv))
    if not distinct:
        return [FusedLevel(level or "label", (None,) * len(names))], False
    if len(distinct) > 1:
        raise FgembedError("late fusion members must share their --levels: " + "; ".join(
            f"{m} {','.join(lv)}" for m, lv in levels.items() if lv))
    shared = distinct[0]
    plain = [m for m in names if not levels[m]]
    if not plain:
        return [FusedLevel(lv, (lv,) * len(names)) for lv in shared], True
    finest = shared[-1]
    other = [m for m in plain if level_key(singles[m].config.head.level) != level_key(finest)]
    if other:
        raise FgembedError(f"late fusion of single- and multi-level members needs the single-level ones trained on "
                           f"the finest level {finest!r}; {', '.join(other)} is not")
    warnings.warn(f"late fusion of single-level ({', '.join(plain)}) and multi-level members scores the finest "
                  f"level ({finest}) only")
    return [FusedLevel(finest, tuple(finest if levels[m] else None for m in names))], False


def late_entries(store: FeatureStore, singles: dict[str, Run], combos: list[Combination], level: str | None,
                 mode: str, weights_from: str) -> list[Entry]:
    """Late fusion of every combination in `combos` from the single runs, all levels
    (`fused_levels`) in one streamed pass: metrics of the finest level at the top, with
    `by_frequency`; per-level ones under `levels`, `consistency` and `mistake_severity` when the
    members are multi-level."""
    first = next(iter(singles.values())).store
    if not all(same_rows(r.store, first) for r in singles.values()):
        raise FgembedError("late fusion members were trained on different stores (different rows): "
                           + ", ".join(str(r.path) for r in singles.values()))
    names = list(singles)
    subsets = [tuple(names.index(m) for m in c.members) for c in combos]
    held = sorted({c for r in singles.values() for c in r.meta.get("holdout_classes", [])})
    novel = np.isin(store.labels(), held) if held else None  # novel test rows are not scored
    levels, per_level = fused_levels(singles, level)
    taxonomy = Taxonomy.from_store(store, [lv.name for lv in levels]) if per_level else None
    labels = [store.labels(level=level_key(lv.name)).astype(np.int64) for lv in levels]
    weights, sample_rows = None, []
    if weights_from == "val":  # per level; the finest level's are the ones reported
        fitted = [fit_subset_weights([LogitSource.of(singles[m], "val", g) for m, g in zip(names, lv.groups)],
                                     subsets, y, mode) for lv, y in zip(levels, labels)]
        weights, sample_rows = [w for w, _ in fitted], fitted[-1][1]
    test = [[LogitSource.of(singles[m], "test", g) for m, g in zip(names, lv.groups)] for lv in levels]
    counts = shared_train_counts(store, list(singles.values()), subsets, levels[-1].name,
                                 int(test[-1][0].array.shape[2]))
    results = stream_late_levels(test, subsets, labels, mode, weights, skip=novel, taxonomy=taxonomy,
                                 train_counts=counts, bins=singles[names[0]].config.head.shot_bins)
    entries = []
    for i, combo in enumerate(combos):
        per_seed, n_rows = results[i]
        seeds = singles[combo.members[0]].metrics["seeds"][:len(per_seed)]
        metrics = summarise(per_seed) | {"per_seed": per_seed, "n_test": n_rows, "seeds": seeds}
        if per_level:
            metrics["level_order"] = [lv.name for lv in levels]
        mean_weights = None
        if weights is not None:
            metrics["late_weight_rows"] = sample_rows[i]
            mean_weights = np.mean(weights[-1][i], axis=0).round(4).tolist()
        entries.append(Entry(combo, metrics, [singles[m].path for m in combo.members], mean_weights))
    return entries


def shared_train_counts(store: FeatureStore, runs: list[Run], subsets: list[tuple[int, ...]], level: str,
                        n_classes: int) -> list[np.ndarray]:
    """Per subset (indices into `runs`): training rows per class at `level` that a fused view of
    its members trains on — the runs' class selection less their held-out classes, rows whose image
    failed in any of its members left out, K per fine class with `--shots K` (a view draws
    min(K, n) rows of each class). What bins the classes for `by_frequency`, as a single or concat
    run of those members bins them."""
    view = runs[0].config.view
    fine = store.labels().astype(np.int64)
    kept = np.ones(len(store.class_names), bool)
    if view.classes is not None:
        kept[:] = False
        kept[list(view.classes)] = True
    codes = store.labels(level=level_key(level)).astype(np.int64)
    train = store.group["samples/split"][:] == SPLIT_NAMES["train"]
    # per member: a concat or sum member loses a row when any of its backbones failed on it
    failed = [np.logical_or.reduce([np.isin(store.status(name), FAILED) for name in run.config.view.features])
              for run in runs]
    out = []
    for subset in subsets:
        held = np.zeros(len(kept), bool)  # the members' held-out classes, together (as late fusion masks them)
        for m in subset:
            held[runs[m].meta.get("holdout_classes", [])] = True
        ok = train & (kept & ~held)[fine] & ~np.logical_or.reduce([failed[m] for m in subset])
        if view.shots is None:
            out.append(np.bincount(codes[ok], minlength=n_classes))
            continue
        group = np.zeros(len(kept), np.int64)
        group[fine[ok]] = codes[ok]  # levels nest: all of a fine class's rows share its group
        shots = np.minimum(np.bincount(fine[ok], minlength=len(kept)), view.shots)
        out.append(np.bincount(group, weights=shots, minlength=n_classes).astype(np.int64))
    return out


def level_block(per_level: dict[str, dict]) -> dict:
    """One seed's `levels` block and `avg_accuracy` (the mean accuracy over levels), as a
    multi-level run's metrics.json holds them."""
    return {"levels": per_level, "avg_accuracy": float(np.mean([m["accuracy"] for m in per_level.values()]))}


def frequency_block(counts: MetricCounts, train_counts: np.ndarray,
                    bins: tuple[int, int] = SHOT_BINS) -> dict[str, dict]:
    """`longtail.by_frequency` from per-class counts (correct and test rows per class), as a
    run's metrics.json holds it: an empty bin's accuracy is None."""
    out = {}
    for name, mask in frequency_bins(train_counts, bins).items():
        n = int(counts.support[torch.as_tensor(mask)].sum())
        correct = float(counts.tp[torch.as_tensor(mask)].sum())
        out[name] = {"accuracy": correct / n if n else None, "n_classes": int(mask.sum()), "n_test": n}
    return out


class LateScores:
    """One subset's running scores for one seed: per-class counts at every level, and with a
    taxonomy the row sums behind consistency and mistake severity. O(classes) memory."""

    def __init__(self, widths: list[int]) -> None:
        self.counts = [MetricCounts(w) for w in widths]
        self.consistent = self.mistakes = self.lca_sum = 0

    def update(self, fused: list[torch.Tensor], ys: list[torch.Tensor], taxonomy: Taxonomy | None) -> None:
        for counts, z, y in zip(self.counts, fused, ys):
            counts.update(z, y)
        if taxonomy is None:
            return
        preds = [z.argmax(1).numpy() for z in fused]
        truth = ys[-1].numpy()
        wrong = preds[-1] != truth
        self.consistent += int(consistent_rows(preds, taxonomy).sum())
        self.mistakes += int(wrong.sum())
        self.lca_sum += int(lca_depth(preds[-1][wrong], truth[wrong], taxonomy).sum())

    def metrics(self, taxonomy: Taxonomy | None, train_counts: np.ndarray | None,
                bins: tuple[int, int]) -> dict:
        """The finest level's metrics (+ `by_frequency`), and with a taxonomy the `levels` block,
        `avg_accuracy`, `consistency` and `mistake_severity` (None without a mistake)."""
        per_level = [c.metrics() for c in self.counts]
        out = dict(per_level[-1])
        if taxonomy is not None:
            out |= level_block(dict(zip(taxonomy.order, per_level))) | {
                "consistency": self.consistent / max(self.counts[-1].rows, 1),
                "mistake_severity": self.lca_sum / self.mistakes if self.mistakes else None}
        if train_counts is not None:
            out["by_frequency"] = frequency_block(self.counts[-1], train_counts, bins)
        return out


def _block_rows(n_members: int, n_classes: int) -> int:
    return int(np.clip(BLOCK_ELEMENTS // max(1, n_members * n_classes), 64, 4096))


def stream_late(sources: list[LogitSource], subsets: list[tuple[int, ...]], labels: np.ndarray, mode: str = "logits",
                weights: list[list[np.ndarray]] | None = None,
                skip: np.ndarray | None = None) -> list[tuple[list[dict], int]]:
    """One level's late fusion (`stream_late_levels` of that level alone): per subset, the
    classification metrics per seed and the rows scored."""
    return stream_late_levels([sources], subsets, [labels], mode, None if weights is None else [weights], skip)


def stream_late_levels(sources: list[list[LogitSource]], subsets: list[tuple[int, ...]], labels: list[np.ndarray],
                       mode: str = "logits", weights: list[list[list[np.ndarray]]] | None = None,
                       skip: np.ndarray | None = None, *, taxonomy: Taxonomy | None = None,
                       train_counts: list[np.ndarray] | None = None,
                       bins: tuple[int, int] = SHOT_BINS) -> list[tuple[list[dict], int]]:
    """Per subset (member indices): (metrics per seed, `LateScores.metrics`; rows scored).

    sources[level][member], coarse → fine (a member's levels share its rows); labels[level] and
    `skip` are indexed by store row; weights[level][subset][seed]: member weights (None: equal).
    A subset is scored on the rows all its members have (a failed image drops out of its
    backbone's run only). Every level of a block is fused before the next block is read, so
    consistency and mistake severity see each row's predictions at all levels; `train_counts`
    (per subset) adds `by_frequency` of the finest level."""
    union = functools.reduce(np.union1d, [s.rows for s in sources[-1]])
    if skip is not None:
        union = union[~skip[union]]
    widths = [int(level[0].array.shape[2]) for level in sources]
    block = _block_rows(len({m for s in subsets for m in s}), sum(widths))
    n_seeds = [min(sources[-1][m].n_seeds for m in subset) for subset in subsets]
    scores = [[LateScores(widths) for _ in range(n)] for n in n_seeds]
    n_rows = [0] * len(subsets)
    for k in range(max(n_seeds)):
        active = [i for i, n in enumerate(n_seeds) if n > k]
        needed = sorted({m for i in active for m in subsets[i]})
        for start in range(0, len(union), block):
            rows = union[start:start + block]
            # each member's block read once per level for every subset
            aligned = [{m: _aligned(level[m], k, rows, w, mode) for m in needed} for level, w in zip(sources, widths)]
            ys = [torch.as_tensor(y[rows]) for y in labels]
            for i in active:
                mask = np.logical_and.reduce([aligned[-1][m][0] for m in subsets[i]])
                if not mask.any():
                    continue
                select = slice(None) if mask.all() else torch.as_tensor(mask)
                fused = []
                for lv, level in enumerate(aligned):
                    w = weights[lv][i][k] if weights is not None else np.full(len(subsets[i]), 1 / len(subsets[i]))
                    z = sum(float(wm) * level[m][1][select] for wm, m in zip(w, subsets[i]))
                    fused.append(z.clamp_min(1e-30).log() if mode == "proba" else z)
                scores[i][k].update(fused, [y[select] for y in ys], taxonomy)
                if k == 0:
                    n_rows[i] += int(mask.sum())
    return [([s.metrics(taxonomy, None if train_counts is None else train_counts[i], bins) for s in per_subset], n)
            for i, (per_subset, n) in enumerate(zip(scores, n_rows))]


def _aligned(source: LogitSource, seed: int, rows: np.ndarray, n_classes: int,
             mode: str) -> tuple[np.ndarray, torch.Tensor]:
    """The member's float32 scores (probabilities for `proba`) at `rows` (zeros where it has none)."""
    lo, hi = np.searchsorted(source.rows, [rows[0], rows[-1] + 1])
    own = source.rows[lo:hi]
    out = torch.zeros(len(rows), n_classes)
    if len(own) == 0:
        return np.zeros(len(rows), bool), out
    idx = np.minimum(np.searchsorted(own, rows), len(own) - 1)
    present = own[idx] == rows
    z = torch.as_tensor(np.asarray(source.array[seed, lo:hi]), dtype=torch.float32)
    if mode == "proba":
        z = torch.softmax(z, dim=1)
    out[torch.as_tensor(present)] = z[torch.as_tensor(idx[present])]
    return present, out


def fit_subset_weights(sources: list[LogitSource], subsets: list[tuple[int, ...]], labels: np.ndarray,
                       mode: str, seed: int = 0) -> tuple[list[list[np.ndarray]], list[int]]:
    """Per subset, per seed: member weights fitted on a seeded sample of the validation rows all
    its members have (at most WEIGHT_ROWS, fewer when classes are many); and the sample sizes."""
    n_classes = int(sources[0].array.shape[2])
    weights, sizes = [], []
    for subset in subsets:
        common = functools.reduce(np.intersect1d, [sources[m].rows for m in subset])
        limit = int(min(WEIGHT_ROWS, max(1000, WEIGHT_ELEMENTS // (len(subset) * n_classes))))
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(common, limit, replace=False)) if len(common) > limit else common
        per_seed = []
        for k in range(min(sources[m].n_seeds for m in subset)):
            parts = [sources[m].take(k, np.searchsorted(sources[m].rows, sample)).astype(np.float32) for m in subset]
            per_seed.append(fit_late_weights(parts, labels[sample], mode))
        weights.append(per_seed)
        sizes.append(len(sample))
    return weights, sizes
