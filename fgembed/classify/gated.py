"""Gated runs: input-gated late fusion of finished member runs (`gate.py`), trained on validation
rows and published as a run directory, so tables, `fgembed predict` and interval estimates read
it like any run.

Where the gate learns: on the validation split, never on test. The member heads' stored
validation logits are what a gate must learn to weigh (train-split logits of heads trained on
those very rows are over-confident: a gate would learn to trust whichever head memorised most).
Out-of-fold train logits would avoid that at the price of retraining every member k times;
validation rows cost nothing more, and `--late-weights val` fits its global weights on them too,
so the two are compared on the same footing. A seeded part of the validation rows
(`GateConfig.select_fraction`) is held out of the gate's training and picks its epoch; the
rest trains it. At most `max_elements` float16 member logits are held (a seeded sample of the
validation rows beyond that). One gate per seed: gate k weighs the members' seed-k heads.

    runs/gated-<members>-<key>/
      config.json     kind "gated"; `gated`: the member runs (directory names, where they were),
                      the mode, the GateConfig, the member backbones the gate reads; `config`: the
                      gate's input view (those backbones, L2-normalised, concatenated) and the
                      members' head settings; the store identity and class names, as any run
      gate-seed<S>.safetensors   each seed's gate (a state dict)
      gate_rows.safetensors      the store rows the gate trained on (`fit`) and selected on (`select`)
      history.json    per seed, per epoch: training loss, the selection rows' loss and weighted F1
      metrics.json    test metrics as any run's, plus the mean gate weight of each member on test
      logits.zarr/    {val,test} [seeds, rows, classes] float16 (the gated fusion), {val,test}_rows

The key hashes the member runs' directory names (which hold their own keys: configuration and
store identity), the mode and the gate's configuration. `member_runs` finds the members again
for `predict`: beside the gated run first (a copied runs folder), else where they were.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import zarr
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from .._version import __version__
from ..devices import resolve_device
from ..errors import FgembedError
from ..progress import progress_bar
from ..store import FeatureStore
from ._logits import FORWARD_ROWS, LOGIT_ROWS, MASKED, create_logits
from .config import RunConfig, class_names, same_rows, store_identity, store_location
from .gate import Gate, GateConfig, fit_gate, gate_input, gated_combine
from .late import check_mode, prepare
from .longtail import shared_train_counts
from .metrics import summarise
from .rundir import FORMAT_VERSION, Run, finished, publish, temp_dir
from .trained import TestScores
from .views import READ_ROWS, level_key

KIND = "gated"
SPLIT_SEED = 0  # the seeded validation sample and its fit / select split (the same for every seed)
ROW_SELECTION = ("classes", "holdout", "holdout_level", "holdout_seed", "shots", "draw")


def is_gated(run: Run) -> bool:
    return run.meta.get("kind") == KIND


def gated_path(members: Sequence[Run], mode: str, config: GateConfig, runs_dir: str | Path) -> Path:
    blob = json.dumps({"members": [m.path.name for m in members], "mode": mode, "gate": dataclasses.asdict(config)},
                      sort_keys=True)
    label = "+".join(m.config.label for m in members)
    return Path(runs_dir) / f"gated-{label}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def fit_gated(store: FeatureStore, members: Sequence[Run], runs_dir: str | Path, *, mode: str = "logits",
              config: GateConfig = GateConfig(), device: str = "auto", force: bool = False,
              progress: bool = False) -> Run:
    """The gated fusion of `members` (finished single-level runs of `store`), trained or reused."""
    check_mode(mode)
    check_members(store, members)
    path = gated_path(members, mode, config, runs_dir)
    if not force and (run := finished(path)) is not None:
        return run
    started = time.perf_counter()
    sources = [_Logits(m) for m in members]
    backbones = list(dict.fromkeys(name for m in members for name in m.config.view.features))
    labels = store.labels(level=level_key(members[0].config.head.level)).astype(np.int64)
    n_classes = sources[0].n_classes
    seeds = list(members[0].config.head.seeds[:min(s.n_seeds for s in sources)])
    val = _common(s.rows["val"] for s in sources)
    sample, fit, select = _validation_sample(val, len(members), n_classes, config)
    dev = resolve_device(device)
    dims = _dims(store, backbones)
    x = torch.as_tensor(_gate_rows(store, backbones, sample)).to(dev)
    x_dim = int(x.shape[1])
    y = torch.as_tensor(labels[sample]).to(dev)
    fits = []
    with progress_bar(len(seeds) * config.epochs, f"gate {path.name}", enabled=progress, unit="epoch") as tick:
        for k, seed in enumerate(seeds):
            z = torch.as_tensor(np.stack([s.at("val", k, sample) for s in sources])).to(dev)
            fits.append(fit_gate(x, z, y, torch.as_tensor(fit, device=dev), torch.as_tensor(select, device=dev),
                                 mode, config, seed, n_classes, lambda: tick(1)))
            del z
    del x
    gates = [_gate(fit.state, x_dim, len(members), config) for fit in fits]
    tmp = temp_dir(path)
    scored = _write_logits(tmp, store, members, sources, backbones, gates, mode, labels, dev)
    for seed, gate in zip(seeds, gates):
        save_torch({k: v.contiguous() for k, v in gate.state_dict().items()}, str(tmp / f"gate-seed{seed}.safetensors"))
    save_numpy({"fit": sample[fit], "select": sample[select]}, str(tmp / "gate_rows.safetensors"))
    (tmp / "history.json").write_text(json.dumps({str(s): f.history for s, f in zip(seeds, fits)}))
    first = members[0].config
    view = dataclasses.replace(first.view, features=tuple(backbones), l2=len(backbones) > 1,
                               fusion="concat" if len(backbones) > 1 else "single")
    run_config = RunConfig(view, dataclasses.replace(first.head, seeds=tuple(seeds)))
    excluded = sorted({int(c) for m in members for c in m.excluded_classes()})
    meta = {"format_version": FORMAT_VERSION, "fgembed_version": __version__, "kind": KIND,
            "config": run_config.to_json(), "store": store_identity(store, tuple(backbones)),
            "store_path": store_location(store), **class_names(store), "dims": dims,
            "holdout_classes": _held(members), "n_classes": n_classes, "excluded_classes": excluded,
            "selection": "f1_weighted on held-out validation rows",
            "gated": {"members": [{"run": m.path.name, "path": str(m.path.resolve())} for m in members],
                      "mode": mode, "gate": dataclasses.asdict(config), "backbones": backbones}}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    per_seed, n_test, weights, dropped = scored
    metrics = summarise(per_seed) | {
        "seeds": seeds, "per_seed": per_seed, "n_test": n_test, "n_val": len(val),
        "test_rows_dropped": dropped, "input_dim": x_dim,
        "members": [m.path.name for m in members], "gate_rows": {"fit": len(fit), "select": len(select)},
        "best_epoch": [f.best_epoch for f in fits], "gate_weights": weights,
        "gate_select_f1": [{"equal": f.history[0]["select_f1"], "gated": f.history[f.best_epoch]["select_f1"]}
                           for f in fits],
        "train_seconds": time.perf_counter() - started}
    return publish(tmp, path, metrics, Run(path, run_config, metrics, meta["store"], meta=meta), replace=force)


def check_members(store: FeatureStore, members: Sequence[Run]) -> None:
    """One line for members a gate cannot weigh together: fewer than two, of another store, with
    other rows or classes selected, other levels, or multi-level."""
    if len(members) < 2:
        raise FgembedError(f"gated fusion weighs two or more member runs; got {len(members)}")
    if len({m.path.resolve() for m in members}) != len(members):
        raise FgembedError("gated fusion: a member run is named twice")
    here = {"manifest_sha256": store.samples_attrs["manifest_sha256"], "content_sha256": store.content_sha256()}
    other = [str(m.path) for m in members if not same_rows(m.store, here)]
    if other:
        raise FgembedError(f"gated fusion members must be runs of store {store.path} (its rows); "
                           f"{', '.join(other)} {'is' if len(other) == 1 else 'are'} not")
    multi = [str(m.path) for m in members if m.config.head.levels]
    if multi:
        raise FgembedError(f"gated fusion weighs single-level runs; {', '.join(multi)} has --levels")
    for what, of in (("rows (--classes, --holdout, --shots)", lambda m: [getattr(m.config.view, f) for f in ROW_SELECTION]),
                     ("levels (--level)", lambda m: m.config.head.level),
                     ("classes", lambda m: m.meta.get("n_classes"))):
        if len({repr(of(m)) for m in members}) > 1:
            raise FgembedError(f"gated fusion members select different {what}: "
                               + ", ".join(str(m.path) for m in members))


def member_runs(run: Run) -> list[Run]:
    """A gated run's members, found beside it (a copied runs folder) or where they were trained."""
    found = []
    for member in run.meta["gated"]["members"]:
        places = [run.path.parent / member["run"], Path(member["path"])]
        where = next((p for p in places if (p / "metrics.json").is_file()), None)
        if where is None:
            raise FgembedError(f"gated run {run.path} fuses run {member['run']}, found neither beside it nor at "
                               f"{member['path']}: copy that run directory beside the gated run")
        found.append(Run.load(where))
    return found


def load_gates(run: Run, device: str = "cpu") -> list[Gate]:
    """Each seed's gate of a gated run (eval mode)."""
    config = GateConfig(**run.meta["gated"]["gate"])
    n_members = len(run.meta["gated"]["members"])
    return [_gate(load_torch(str(run.path / f"gate-seed{seed}.safetensors")), sum(run.meta["dims"]), n_members,
                  config).to(resolve_device(device)) for seed in run.config.head.seeds]


@torch.no_grad()
def gated_scores(run: Run, members: Sequence[Run], embeddings: Sequence[np.ndarray],
                 member_scores: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Each seed's gated scores of new rows: `embeddings` per backbone the gate reads (the run's
    `gated.backbones`), `member_scores[member][seed]` the members' head logits of those rows
    (masked here as stored logits are, so the gate fuses what it was trained on)."""
    mode = run.meta["gated"]["mode"]
    x = torch.as_tensor(gate_input(embeddings))
    prepared = []
    for member, per_seed in zip(members, member_scores, strict=True):
        masked = [np.array(s, np.float32) for s in per_seed]
        for s in masked:
            s[:, member.excluded_classes()] = MASKED
        prepared.append([prepare(s, mode) for s in masked])
    return [gated_combine([p[k] for p in prepared], gate(x), mode).numpy() for k, gate in enumerate(load_gates(run))]


class _Logits:
    """A member's stored logits: each split's rows (sorted store rows) and [seeds, rows, classes] array."""

    def __init__(self, run: Run) -> None:
        group = zarr.open_group(run.path / "logits.zarr", mode="r")
        self.rows = {split: group[f"{split}_rows"][:] for split in ("val", "test")}
        self.arrays = {split: group[split] for split in ("val", "test")}
        self.n_seeds, self.n_classes = int(self.arrays["test"].shape[0]), int(self.arrays["test"].shape[2])

    def at(self, split: str, seed: int, rows: np.ndarray) -> np.ndarray:
        """float16 [rows, classes] of seed `seed` at store `rows` (rows this member has)."""
        positions = np.searchsorted(self.rows[split], rows)
        return self.arrays[split].get_orthogonal_selection((seed, positions, slice(None)))


def _common(rows) -> np.ndarray:
    return functools.reduce(np.intersect1d, rows)


def _held(members: Sequence[Run]) -> list[int]:
    return sorted({int(c) for m in members for c in m.meta.get("holdout_classes", [])})


def _dims(store: FeatureStore, backbones: list[str]) -> list[int]:
    return [int(store.backbone_attrs(name)["dim"]) for name in backbones]


def _gate(state: dict, in_dim: int, n_members: int, config: GateConfig) -> Gate:
    gate = Gate(in_dim, n_members, config.hidden, config.dropout)
    gate.load_state_dict(state)
    return gate.eval()


def _validation_sample(rows: np.ndarray, n_members: int, n_classes: int,
                       config: GateConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the sorted validation rows the gate reads, positions in it that train, positions that select)."""
    limit = max(2, config.max_elements // (n_members * n_classes))
    rng = np.random.default_rng(SPLIT_SEED)
    sample = np.sort(rng.choice(rows, limit, replace=False)) if len(rows) > limit else rows
    if len(sample) < 2:
        raise FgembedError(f"gated fusion trains its gate on validation rows; the members share {len(sample)}")
    order = rng.permutation(len(sample))
    n_select = min(len(sample) - 1, max(1, round(config.select_fraction * len(sample))))
    return sample, np.sort(order[n_select:]), np.sort(order[:n_select])


def _gate_rows(store: FeatureStore, backbones: list[str], rows: np.ndarray) -> np.ndarray:
    """`gate_input` of sorted store `rows`, read block by block (whole shards, only blocks that hold rows)."""
    readers = [store.embedding_reader(name) for name in backbones]
    out = np.empty((len(rows), sum(_dims(store, backbones))), np.float32)
    for span in store.row_blocks(READ_ROWS):
        lo, hi = np.searchsorted(rows, [span.start, span.stop])
        if lo < hi:
            picked = rows[lo:hi] - span.start
            out[lo:hi] = gate_input([read(span)[picked] for read in readers])
    return out


@torch.no_grad()
def _write_logits(tmp: Path, store: FeatureStore, members: Sequence[Run], sources: list[_Logits],
                  backbones: list[str], gates: list[Gate], mode: str, labels: np.ndarray,
                  device: torch.device) -> tuple[list[dict], int, list[list[float]], int]:
    """Write the gated val and test logits (float16, whole chunks) and score the test blocks as
    stored: (metrics per seed, test rows scored, mean test gate weight per seed and member,
    test rows left out because some member lacks them)."""
    group = zarr.open_group(tmp / "logits.zarr", mode="w")
    gates = [g.to(device) for g in gates]
    excluded = torch.as_tensor(sorted({int(c) for m in members for c in m.excluded_classes()}), dtype=torch.long,
                               device=device)
    test = _common(s.rows["test"] for s in sources)
    seen = ~np.isin(store.labels()[test], _held(members))
    first = members[0].config.head
    counts = shared_train_counts(store, list(members), [tuple(range(len(members)))], first.level or "label",
                                 sources[0].n_classes)[0]
    scorers = [TestScores(labels[test], seen, sources[0].n_classes, counts, first.shot_bins) for _ in gates]
    weight_sums = np.zeros((len(gates), len(members)))
    for split in ("val", "test"):
        rows = test if split == "test" else _common(s.rows["val"] for s in sources)
        group.create_array(f"{split}_rows", data=rows.astype(np.int64))
        array = create_logits(group, split, len(gates), len(rows), sources[0].n_classes)
        for start in range(0, len(rows), LOGIT_ROWS):
            block = rows[start:start + LOGIT_ROWS]
            x = torch.as_tensor(_gate_rows(store, backbones, block)).to(device)
            for k, gate in enumerate(gates):
                z = [s.at(split, k, block) for s in sources]  # float16, each member's chunks read once
                w = gate(x)
                out = np.empty((len(block), sources[0].n_classes), np.float16)
                for i in range(0, len(block), FORWARD_ROWS):  # float32 scratch: members × FORWARD_ROWS × classes
                    piece = slice(i, i + FORWARD_ROWS)
                    fused = gated_combine([prepare(torch.as_tensor(zi[piece]).to(device), mode) for zi in z],
                                          w[piece], mode)
                    if len(excluded):
                        fused.index_fill_(1, excluded, MASKED)
                    out[piece] = fused.half().cpu().numpy()
                if split == "test":
                    weight_sums[k] += w[torch.as_tensor(seen[start:start + LOGIT_ROWS], device=device)
                                        ].sum(0).double().cpu().numpy()
                array[k:k + 1, start:start + len(block)] = out[None]
                if split == "test":
                    scorers[k].update(start, [out])
    n_test = int(seen.sum())
    dropped = len(functools.reduce(np.union1d, [s.rows["test"] for s in sources])) - len(test)
    return [s.metrics() for s in scorers], n_test, (weight_sums / max(n_test, 1)).round(4).tolist(), dropped
