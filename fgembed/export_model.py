"""One file that classifies images with torch alone (or onnxruntime): `fgembed export-model`.

What `fgembed predict` does to an image, as one module traced into a file: each member backbone
rebuilt as its run recorded it (`predict.load_groups`; any strict fingerprint change is refused,
`predict.check_rebuilt`), extraction's device-side preprocessing (`devices.DeviceModel`: uint8 →
/255 → −mean → /std → the weights' dtype), each embedding rounded to the dtype its store kept,
the run's fitted fusion (`Fusion.torch_module`) rounded to the float16 rows its heads were
trained on, every seed's head, the seeds and then the runs fused late (`predict.fused_scores`:
`classify.late`'s rule) with the classes a run cannot know masked (`predict.masked`), a softmax.
A gated run ships its member runs and its gates, which weigh them per image (`classify.gate`).

Input: one uint8 RGB tensor [N, 3, H, W] per distinct preprocessing of the members (one for
most ensembles), already resized and cropped by the backbone library's own eval transform (a
library that resizes in float, DINOv3's image processor, takes its transform's float output, as
extraction feeds it); output: class probabilities [N, C]. The file carries a JSON document
(`METADATA`): the class names, what each input is and how to make it, the runs and backbones.

Formats: `export_formats` (torch.export's .pt2 by default, TorchScript, ONNX). Each file is
loaded back the way a user loads it and checked against the module it was traced from, on a
batch of another size, before it is moved into place.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._version import __version__
from .backbones import LoadOptions, Preprocessing, load_backbone, load_preprocessing, split_name
from .classify._logits import MASKED
from .classify.gate import gated_combine
from .classify.gated import is_gated, load_gates, member_runs
from .classify.late import check_mode, prepare
from .classify.registry import head_class
from .classify.rundir import Run
from .devices import DeviceModel, Precision, resolve_device, resolve_precision
from .errors import FgembedError
from .export_formats import LOADERS, SAVERS, format_of, onnx_modules
from .predict import check_compatible, check_rebuilt, fused_scores, load_groups, masked, members_of, target_names

TRACE_ROWS, CHECK_ROWS = 2, 3  # the example batch traced, and the other batch size the file is checked on
TOLERANCE = 1e-3  # max |Δ probability| between the file and the module it was traced from


@dataclass
class Exported:
    """What `export_model` wrote: the file (and `files`: with ONNX's external weights, if any), its
    format, its metadata and how far the file's probabilities were from the module's on the check
    batch."""

    path: Path
    format: str
    metadata: dict
    max_error: float
    files: list[Path]


class _Backbone(nn.Module):
    """One model's forward through extraction's `DeviceModel` (its device-side preprocessing, its
    variants' embeddings from one pass), each embedding rounded to the dtype its store kept. The
    model and DeviceModel's mean / std are registered here, so they are the file's weights and
    buffers (the tracers find a tensor by identity, whoever holds it)."""

    def __init__(self, model: DeviceModel, dtypes: Sequence[torch.dtype]) -> None:
        super().__init__()
        self.model, self.device_model, self.dtypes = model.backbone.model, model, list(dtypes)
        self.model.to(memory_format=torch.contiguous_format)  # whole tensors: torch.export packages them as they are
        self.register_buffer("mean", model.mean)
        self.register_buffer("std", model.std)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [e.to(dtype).float() for e, dtype in zip(self.device_model(images), self.dtypes, strict=True)]


class _Seeds(nn.Module):
    """A run's scores of each seed from its members' embeddings (by name): its fusion, rounded to
    the float16 design rows its heads were trained on, then each seed's head (the finest level of
    a multi-level one)."""

    def __init__(self, run: Run, device: torch.device) -> None:
        super().__init__()
        self.features, self.levels = list(run.config.view.features), bool(run.config.head.levels)
        self.fusion = run.load_fusion().torch_module().to(device)
        heads = run.load_heads(str(device))
        self.heads = nn.ModuleList(heads if self.levels else [h.module_ for h in heads])

    def forward(self, embeddings: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        x = self.fusion([embeddings[name] for name in self.features]).half().float()
        return [(head(x)[-1] if self.levels else head(x)).float() for head in self.heads]


class _GatedSeeds(nn.Module):
    """A gated run's scores of each seed: gate k's per-image weighting of its member runs' seed-k
    scores (`classify.gated`), the members' unknown classes masked as their stored logits are. The
    gate reads the run's own view (its backbones, L2-normalised, side by side)."""

    def __init__(self, run: Run, device: torch.device) -> None:
        super().__init__()
        members = member_runs(run)
        self.members = nn.ModuleList(_Seeds(member, device) for member in members)
        self.gates = nn.ModuleList(load_gates(run, str(device)))
        self.view, self.view_features = run.load_fusion().torch_module().to(device), list(run.config.view.features)
        self.mode = run.meta["gated"]["mode"]
        for i, member in enumerate(members):
            self.register_buffer(f"excluded{i}", _excluded(member, device))

    def forward(self, embeddings: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        x = self.view([embeddings[name] for name in self.view_features])
        prepared = []
        for i, member in enumerate(self.members):
            excluded = getattr(self, f"excluded{i}")
            per_seed = [s if excluded is None else s.index_fill(1, excluded, MASKED) for s in member(embeddings)]
            prepared.append([prepare(s, self.mode) for s in per_seed])
        return [gated_combine([p[k] for p in prepared], gate(x), self.mode) for k, gate in enumerate(self.gates)]


def _excluded(run: Run, device: torch.device) -> torch.Tensor | None:
    """The run's unknown classes as a tensor; none, None (torch.export cannot package an empty buffer)."""
    excluded = run.excluded_classes()
    return torch.as_tensor(excluded, dtype=torch.long, device=device) if len(excluded) else None


class _RunScores(nn.Module):
    """One run's scores: its seeds fused late, the classes it cannot know masked (`predict`'s rule)."""

    def __init__(self, run: Run, late_mode: str, device: torch.device) -> None:
        super().__init__()
        self.seeds = _GatedSeeds(run, device) if is_gated(run) else _Seeds(run, device)
        self.late_mode = late_mode
        self.register_buffer("excluded", _excluded(run, device))

    def forward(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = fused_scores(self.seeds(embeddings), self.late_mode)
        return scores if self.excluded is None else masked(scores, self.excluded, self.late_mode)


class ShippedModel(nn.Module):
    """Images (one tensor per input of the metadata) → class probabilities [N, C]."""

    def __init__(self, backbones: Sequence[_Backbone], slots: Sequence[int], order: Sequence[str],
                 runs: Sequence[_RunScores], late_mode: str) -> None:
        super().__init__()
        self.backbones, self.runs = nn.ModuleList(backbones), nn.ModuleList(runs)
        self.slots, self.order, self.late_mode = list(slots), list(order), late_mode

    def forward(self, *images: torch.Tensor) -> torch.Tensor:
        embeddings = [e for backbone, slot in zip(self.backbones, self.slots) for e in backbone(images[slot])]
        by_name = dict(zip(self.order, embeddings, strict=True))
        return torch.softmax(fused_scores([run(by_name) for run in self.runs], self.late_mode), dim=1)


def export_model(run_dirs: Sequence[str | Path], out: str | Path, *, fmt: str | None = None,
                 late_mode: str = "logits", device: str = "cpu", load: LoadOptions | None = None,
                 weights: dict[str, Path] | None = None) -> Exported:
    """Write the runs (late-fused when several) with their backbones as one model file; see the
    module docstring. `device` is where it is traced (a CPU file runs anywhere)."""
    out, fmt = Path(out), format_of(out, fmt)
    if fmt == "onnx":
        onnx_modules()
    model, metadata = build_model(run_dirs, late_mode=late_mode, device=device, load=load, weights=weights)
    metadata["format"] = fmt
    where = resolve_device(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), tempfile.TemporaryDirectory(dir=out.parent, prefix=".fgembed-export-") as tmp:
        target = Path(tmp) / out.name  # the final name: ONNX's external weights file is named after it
        SAVERS[fmt](model, examples(metadata, TRACE_ROWS, where, 0), target, json.dumps(metadata))
        error = _check(model, LOADERS[fmt](target, where)[0], examples(metadata, CHECK_ROWS, where, 1))
        files = [out.parent / made.name for made in sorted(Path(tmp).iterdir())]
        for made in files:
            os.replace(Path(tmp) / made.name, made)
    return Exported(out, fmt, metadata, error, files)


def build_model(run_dirs: Sequence[str | Path], *, late_mode: str = "logits", device: str = "cpu",
                load: LoadOptions | None = None, weights: dict[str, Path] | None = None
                ) -> tuple[ShippedModel, dict]:
    """The module a file is traced from (eval mode, on `device`) and its metadata, less `format`."""
    if not run_dirs:
        raise FgembedError("name at least one --run")
    check_mode(late_mode)
    runs = [Run.load(p) for p in run_dirs]
    check_compatible(runs)
    for run in runs:
        _check_exportable(run)
    where = resolve_device(device)
    backbones, slots, order, inputs = _backbones(runs, load, weights or {}, where)
    model = ShippedModel(backbones, slots, order, [_RunScores(run, late_mode, where) for run in runs],
                         late_mode).eval()
    return model, _metadata(runs, inputs, order, late_mode, where)


def _check_exportable(run: Run) -> None:
    """One line for what cannot ship: a head that is no network, a fusion with no torch form (a
    gated run: in any of its member runs)."""
    if is_gated(run):
        for member in member_runs(run):
            _check_exportable(member)
        return
    head = run.config.head.head
    if not run.config.head.levels and not head_class(head).exportable:
        raise FgembedError(f"run {run.path.name}: the {head} head cannot be exported (it searches its stored "
                           "training rows rather than run a network); export a run of a trained head (mlp, linear, "
                           "logreg)")
    if run.load_fusion().torch_module() is None:
        raise FgembedError(f"run {run.path.name}: the {run.config.view.fusion} fusion has no torch form "
                           "(Fusion.torch_module), so it cannot be exported")


def _precision(name: str, device: torch.device, members: Sequence[str]) -> Precision:
    try:
        return resolve_precision(name, device)
    except FgembedError:
        raise FgembedError(f"{', '.join(members)} were extracted in {name}, which needs CUDA: export with "
                           "--device cuda") from None


def _by_model(names: Sequence[str]) -> dict[str, list[str]]:
    """Member names grouped by model (base and size): one forward serves all of a model's variants."""
    models: dict[str, list[str]] = {}
    for name in names:
        base, size, _ = split_name(name)
        models.setdefault(base + (f"~{size}" if size else ""), []).append(name)
    return models


def _backbones(runs: Sequence[Run], load: LoadOptions | None, weights: dict[str, Path], device: torch.device
               ) -> tuple[list[_Backbone], list[int], list[str], list[dict]]:
    """Each model the runs need, built once as recorded (refused where its rebuilt fingerprint
    differs); the input each reads (models of one preprocessing share one); the members' order of
    embeddings; each input's description."""
    members = members_of(runs)
    modules, slots, order, inputs, keys = [], [], [], [], []
    for options, precision_name, dtype, names in load_groups(members, load, weights):
        precision = _precision(precision_name, device, names)
        for model_name, group in _by_model(names).items():
            pre = load_preprocessing(model_name, options)
            feed = "uint8" if _uint8(pre) else "float"  # as extraction feeds it
            backbone = load_backbone(model_name, options, device, precision.weights, preprocessing=pre)
            variants = backbone.variants([split_name(name)[2] for name in group])
            for name, member in zip(group, variants, strict=True):
                rebuilt = {**member.fingerprint, "precision": precision.name, "compile": False, "feed": feed}
                check_rebuilt(name, members[name], rebuilt)
            device_model = DeviceModel(variants[0], device, precision, False, embed=variants[0].readout(
                [member.variant for member in variants]))
            dtypes = [getattr(torch, members[name].get("dtype", "float16")) for name in group]
            modules.append(_Backbone(device_model, dtypes))
            order += group
            if pre.key() not in keys:
                keys.append(pre.key())
                inputs.append(_input(pre, variants[0].fingerprint))
            slots.append(keys.index(pre.key()))
            inputs[slots[-1]]["backbones"] += group
    for i, spec in enumerate(inputs):
        spec["name"] = "images" if len(inputs) == 1 else f"images{i}"
    return modules, slots, order, inputs


def _uint8(pre: Preprocessing) -> bool:
    """Whether the library's transform splits into a uint8 resize/crop and a normalisation."""
    return pre.geometric is not None and bool(pre.mean)


def _input(pre: Preprocessing, fingerprint: dict) -> dict:
    """What an input is and how a caller makes it: the library's own resize/crop as uint8 (the
    model normalises); where the library resizes in float (DINOv3's image processor), its whole
    transform's float output, since no uint8 resize reproduces it."""
    spec = {"shape": ["N", *pre.input_shape], "layout": "RGB, channels first", "source": fingerprint["source"],
            "preprocessing": fingerprint["preprocessing"], "image_policy": fingerprint["image_policy"],
            "backbones": []}
    if _uint8(pre):
        return {**spec, "dtype": "uint8", "transform": " ".join(repr(pre.geometric).split()),
                "normalised_in_the_model": {"scale": "1/255", "mean": list(pre.mean), "std": list(pre.std)}}
    return {**spec, "dtype": "float32", "transform": " ".join(repr(pre.transform).split())}


def _metadata(runs: Sequence[Run], inputs: list[dict], order: list[str], late_mode: str,
              device: torch.device) -> dict:
    names, levels = target_names(runs[0])
    recorded = members_of(runs)
    return {
        "fgembed_version": __version__, "torch_version": torch.__version__,
        "traced_on": device.type, "inputs": inputs,
        "output": {"name": "probabilities", "dtype": "float32", "shape": ["N", len(names)],
                   "what": "class probabilities (softmax of the runs' late-fused scores); column c is class_names[c]"},
        "class_names": names,
        "taxonomy": {level: [level_names[codes[c]] for c in range(len(names))]
                     for level, (codes, level_names) in levels.items()},
        "late_mode": late_mode,
        "runs": [{"run": run.path.name, "features": list(run.config.view.features), "fusion": run.config.view.fusion,
                  "head": run.config.head.head, "levels": list(run.config.head.levels),
                  "seeds": list(run.config.head.seeds),
                  **({"gated": [m["run"] for m in run.meta["gated"]["members"]]} if is_gated(run) else {}),
                  "test": {k: run.metrics[k] for k in ("accuracy", "f1") if k in run.metrics}} for run in runs],
        "backbones": [{"name": name, "weights": recorded[name]["fingerprint"].get("weights"),
                       "precision": recorded[name]["fingerprint"].get("precision"),
                       "stored_dtype": recorded[name].get("dtype", "float16")} for name in order],
    }


def examples(metadata: dict, rows: int, device: torch.device | str = "cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs of a model's metadata, each of its dtype (uint8 pixels, or normalised floats)."""
    generator = torch.Generator().manual_seed(seed)
    made = []
    for spec in metadata["inputs"]:
        shape = (rows, *spec["shape"][1:])
        made.append(torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8) if spec["dtype"] == "uint8"
                    else torch.randn(shape, generator=generator))
    return tuple(x.to(device) for x in made)


def _check(model: nn.Module, loaded: Callable, examples: tuple[torch.Tensor, ...]) -> float:
    """The file's largest probability difference from the module on a batch of another size
    than the traced one (a trace that kept the example's batch size fails here, not at a user's)."""
    want = model(*examples).float().cpu().numpy()
    got = np.asarray(loaded(*examples), np.float32)
    error = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    if not error <= TOLERANCE:
        raise FgembedError(f"the exported file's probabilities differ from fgembed's by {error:.3g} on a batch of "
                           f"{len(examples[0])} (traced on {TRACE_ROWS}): nothing was written")
    return error


def load_exported(path: str | Path, fmt: str | None = None, device: str = "cpu") -> tuple[Callable, dict]:
    """(a function of the input tensors giving probabilities as numpy, the metadata) of an exported
    file, loaded as a user without fgembed loads it (README, "Shipping a model")."""
    return LOADERS[format_of(path, fmt)](Path(path), resolve_device(device))
