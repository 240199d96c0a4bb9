"""Knowledge distillation (`fgembed distill`): one cheap view learns what an ensemble knows.

The teacher is the late fusion of its members' single runs — the runs `fgembed ensemble` trains
for them, reused when finished, with the student's head and row selection — seed by seed: the
student's seed s learns from the late fusion (logits averaged, `late.prepare` / `combine`) of
every member's seed s, which is the `late` row of an ensemble table of those members. The loss
and its defaults are Hinton, Vinyals & Dean's ("Distilling the Knowledge in a Neural Network"),
in `soft_targets.py`. `distill` also trains (or reuses) the student's own plain head, the run
`fgembed fit` makes of the same view, so what distillation keeps is read against both.

Runs store val and test logits only, so the teacher's training-split logits come from the
member runs' saved heads: each member's embeddings are read in row blocks (whole shards)
through the store's accessors, through the run's fusion and every seed's head, masked and
rounded to float16 as stored logits are, fused, and kept as top-k targets
(`soft_targets.TargetBuilder`): at iNat shape the dense targets would be 16 GB per seed, the
top-64 ones are 150 MB. The student trains on its view's training rows less those with no
target (an image that failed in a teacher member), counted as dropped in its metrics.json.

The student is a run like any other (`ensemble --run`, `predict`, late fusion with other runs);
its key holds the teacher's members and their extraction, and the distillation settings.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..devices import resolve_device
from ..errors import FgembedError
from ..progress import progress_bar
from ..store import FeatureStore
from ._logits import FORWARD_ROWS, MASKED
from .blocks import blocks
from .config import RunConfig
from .fitting import check_levels, fit_run, run_path
from .late import combine, prepare
from .rundir import Run, finished
from .soft_targets import SoftTargets, TargetBuilder
from .views import READ_ROWS, View, build_view

TARGET_ELEMENTS = 1 << 24  # scores per fused piece, over its members and their sum: 64 MiB of float32
LATE_MODE = "logits"       # the teacher's rule: ensemble's default late fusion


@dataclass
class Distilled:
    """What `distill` trained or reused: the student, its own plain head, the teacher's members."""

    student: Run
    plain: Run
    teachers: list[Run]


def plain_config(config: RunConfig) -> RunConfig:
    """The student's view with its head trained plainly: what distillation is measured against."""
    return dataclasses.replace(config, head=dataclasses.replace(config.head, teacher=()))


def teacher_config(config: RunConfig, member: str) -> RunConfig:
    """A teacher member's single run: the student's head and row selection, no distillation (the
    run `fgembed ensemble` trains for that member with the same options)."""
    plain = plain_config(config)
    return dataclasses.replace(plain, view=dataclasses.replace(plain.view, features=(member,), fusion="single"))


def check_distillation(store: FeatureStore, config: RunConfig) -> None:
    """Refuse, in one line before any work, a request that cannot distil anything."""
    teacher = config.head.teacher
    if not teacher:
        raise FgembedError("distillation needs a teacher: name its members (--teacher A,B,…)")
    for name in dict.fromkeys(teacher + config.view.features):
        store.backbone_info(name)  # an unknown member: the store's one line, with the names it has
    if len(teacher) == 1 and config.view.features == teacher:
        raise FgembedError(f"the teacher {teacher[0]} is the student's own plain head: distil an ensemble "
                           "(two or more --teacher members) or into another --student")
    check_levels(store, config)


def distill(store: FeatureStore, config: RunConfig, runs_dir, *, device: str = "auto", force: bool = False,
            progress: bool = False, **fit_options) -> Distilled:
    """Train (or reuse) the teacher members' runs, the student's plain head and the distilled
    student of `config` (`config.head.teacher` names the teacher); `fit_options` go to every
    `fit_run`."""
    check_distillation(store, config)
    options = {"device": device, "force": force, "progress": progress, **fit_options}
    teachers = [fit_run(store, teacher_config(config, m), runs_dir, **options) for m in config.head.teacher]
    plain_cfg = plain_config(config)
    todo = [c for c in (plain_cfg, config) if force or finished(run_path(store, c, runs_dir)[0]) is None]
    view = build_view(store, config.view, progress=progress, device=device) if todo else None
    plain = fit_run(store, plain_cfg, runs_dir, view=view, **options)
    if config not in todo:
        return Distilled(fit_run(store, config, runs_dir, **options), plain, teachers)
    view, targets = training_targets(store, view, teachers, config, device, progress)
    student = fit_run(store, config, runs_dir, view=view, soft_targets=targets, **options)
    return Distilled(student, plain, teachers)


def training_targets(store: FeatureStore, view: View, teachers: list[Run], config: RunConfig,
                     device: str = "auto", progress: bool = False) -> tuple[View, SoftTargets]:
    """The student's training view (its rows with a teacher target) and the teacher's targets
    over them, per seed. `view` is compacted in place when rows go: use the view returned."""
    h = config.head
    failed = np.zeros(store.n_rows, bool)
    for name in dict.fromkeys(f for run in teachers for f in run.config.view.features):
        failed[store.failed_rows(name)] = True
    usable = ~failed[view.rows["train"]]
    rows = view.rows["train"][usable]
    excluded = np.union1d(view.excluded_classes(h.level),
                          np.concatenate([run.excluded_classes() for run in teachers])).astype(np.int64)
    builder = TargetBuilder(len(h.seeds), len(rows), view.n_classes(h.level), h.kd_top_k, h.temperature, excluded)
    fill_targets(builder, store, teachers, rows, device, progress)
    keep = usable.copy()
    keep[usable] = builder.finite  # a non-finite teacher score (an unflagged bad row of an old store): no target
    if not keep.any():
        raise FgembedError(f"no training row of {config.label} has a teacher target: each image failed in a "
                           "teacher member (see fgembed info)")
    record = {"teacher_runs": [str(run.path) for run in teachers], "late_mode": LATE_MODE, "top_k": builder.k,
              "spread": builder.spread}
    targets = builder.finish(h.kd_alpha, builder.finite, record)
    targets.record["mean_residual"] = float(targets.residual.mean()) if targets.n_rows else 0.0
    return view.keep_rows("train", keep), targets


@torch.no_grad()
def fill_targets(builder: TargetBuilder, store: FeatureStore, teachers: list[Run], rows: np.ndarray,
                 device: str = "auto", progress: bool = False) -> None:
    """Every seed's late fusion of the teachers' logits of the sorted store `rows`, into `builder`:
    the members' embeddings read block by block, each through its run's fusion and heads."""
    dev = resolve_device(device)
    members = []
    for run in teachers:
        members.append(([store.embedding_reader(name) for name in run.config.view.features], run.load_fusion(),
                        [head.module_.eval() for head in run.load_heads(str(dev))],
                        torch.as_tensor(run.excluded_classes(), dtype=torch.long, device=dev)))
    piece = max(1, min(FORWARD_ROWS, TARGET_ELEMENTS // (builder.n_classes * (len(members) + 1))))
    spans = [s for s in store.row_blocks(READ_ROWS) if np.searchsorted(rows, s.start) < np.searchsorted(rows, s.stop)]
    with progress_bar(len(spans), "teacher targets", enabled=progress, unit="block") as tick:
        for span in spans:
            lo, hi = np.searchsorted(rows, [span.start, span.stop])
            local = rows[lo:hi] - span.start
            X = [fusion.transform([read(span)[local] for read in readers]) for readers, fusion, _, _ in members]
            for part in blocks(hi - lo, piece):
                x = [torch.as_tensor(m[part]).to(dev).float() for m in X]
                fused = [combine([prepare(_stored_logits(heads[s], xm, masked), LATE_MODE)
                                  for xm, (_, _, heads, masked) in zip(x, members)], None, LATE_MODE)
                         for s in range(builder.n_seeds)]
                builder.add(slice(lo + part.start, lo + part.stop), torch.stack(fused))
            tick(1)


def _stored_logits(module: torch.nn.Module, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """A head's logits as its run stores them (masked classes at MASKED, rounded to float16):
    so the teacher on any rows is what `ensemble` fuses from the stored logits."""
    z = module(x).float()
    if len(masked):
        z.index_fill_(1, masked, MASKED)
    return z.half().float()
