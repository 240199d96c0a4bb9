"""What every adapter returns: a model with its own preprocessing and embedding function."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..devices import release_freed_host_memory
from ..errors import FgembedError
from ..images import IMAGE_POLICY
from .variants import POOLINGS, TokenForward, Variant, readout, split_name, variant_fingerprint


@dataclass
class LoadOptions:
    """How to materialise a spec: these all change the numbers and enter the fingerprint."""

    pretrained: bool = True
    weights: Path | None = None  # a local checkpoint (file, or a directory for Hugging Face)
    image_size: int | None = None
    # The output of a name without a pooling suffix (None: the model's own); `name~mean` is the
    # way to ask for another pooling (a group of its own). Kept for stores written before variants.
    pooling: str | None = None
    cache_dir: Path | None = None


@dataclass(frozen=True)
class Placement:
    """Where the weights go, and in which floating dtype, as soon as the library has built one model:
    before the next is built, so the host holds one model's fp32 weights at a time, not every
    model's. Not in the fingerprint (the caller records the precision it asked for). None: as built
    (the CPU, fp32)."""

    device: torch.device | None = None
    dtype: torch.dtype | None = None

    def apply(self, model: torch.nn.Module) -> None:
        """Move and cast in one `.to` (each parameter's host fp32 storage is released as it goes:
        nothing else holds it), then give the freed pages back to the OS; a no-op where the model
        already is."""
        if self.device is not None or self.dtype is not None:
            model.to(device=self.device, dtype=self.dtype)
            release_freed_host_memory()


@dataclass
class Backbone:
    """A frozen model ready for extraction, and the feature group it writes.

    `transform` maps one decoded RGB PIL image to the model's input tensor (the source library's
    own eval preprocessing); `embed` maps a batch of those to [B, dim] embeddings of this
    backbone's variant (`name`'s suffixes, see `variants`); `own` is the model's own output.
    `readout(variants)` gives several variants of the same model from one forward.
    """

    name: str
    model: torch.nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    embed: Callable[[torch.Tensor], torch.Tensor]
    dim: int
    input_shape: tuple[int, ...]
    convolutional: bool
    fingerprint: dict = field(default_factory=dict)
    # The transform split for a uint8 feed: `geometric` is the library's own resize/crop ending in
    # a uint8 CHW tensor (None when the library's transform cannot be split that way: then the
    # float `transform` is used); `mean`/`std` normalise on the device after scaling to [0, 1].
    geometric: Callable[[Image.Image], torch.Tensor] | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    # A text tower (open_clip members): (class names, prompt templates) → [C, dim] class embeddings,
    # each the normalised mean of its prompts' normalised embeddings (see `backbones.text`).
    text_encoder: Callable[[Sequence[str], Sequence[str]], torch.Tensor] | None = None
    # Token outputs (ViTs): blocks' tokens after the final norm, through the library's own API.
    own: Callable[[torch.Tensor], torch.Tensor] | None = None
    tokens: TokenForward | None = None
    n_blocks: int = 0
    has_cls: bool = False
    variant: Variant = field(default_factory=Variant)
    model_name: str = ""  # `name` without its variant suffixes: which model (and size) this is
    model_fingerprint: dict = field(default_factory=dict)  # the plain output's, before any variant

    @property
    def has_text(self) -> bool:
        return self.text_encoder is not None

    def readout(self, variants: Sequence[Variant]) -> Callable[[torch.Tensor], list[torch.Tensor]]:
        """Every variant's embeddings of a batch, from one forward of the model."""
        return readout(variants, self.own, self.tokens, self.n_blocks, self.has_cls, self.model_name)

    def variants(self, variants: Sequence[Variant]) -> list[Backbone]:
        """This model as the given variants (names, fingerprints, dims: probed together, once); they
        share the model, so `DeviceModel` over `readout(variants)` runs it once per batch."""
        if all(v.plain for v in variants):
            return [self.as_variant(Variant(), self.dim) for _ in variants]
        device, dtype = weights_device_dtype(self.model)
        probe = self.transform(probe_image()).unsqueeze(0).to(device=device, dtype=dtype)
        with torch.inference_mode():
            dims = [int(e.shape[-1]) for e in self.readout(variants)(probe)]
        return [self.as_variant(v, d) for v, d in zip(variants, dims)]

    def as_variant(self, variant: Variant, dim: int) -> Backbone:
        one = self.readout([variant])
        return replace(self, name=self.model_name + variant.suffix, variant=variant, dim=dim,
                       embed=self.own if variant.plain else lambda x: one(x)[0],
                       fingerprint=variant_fingerprint(self.model_fingerprint, variant, self.n_blocks))


def library_versions(*names: str) -> dict[str, str]:
    """Versions of what made the numbers: recorded beside the fingerprint (a change warns, never
    refuses: a patch release of Pillow or torchvision should not force a re-extraction)."""
    return {n: importlib.metadata.version(n) for n in ("torch", "torchvision", "pillow", "numpy", *names)}


def _hash_files(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def weights_id(options: LoadOptions, tag: str | None) -> str:
    """Name the weights: random init, local files (by content hash: a `--weights` checkpoint, a
    local Hugging Face folder given as the repo, open_clip's `local-dir:` package) or the
    library's tag (hub weights are pinned by the library; their revision is recorded)."""
    if not options.pretrained:
        return "random-init:seed0"
    if options.weights is not None:
        path = Path(options.weights)
        if not path.exists():
            raise FgembedError(f"weights not found: {path}")
        return f"file:{path.name}:sha256:{_hash_files(path)}"
    local = Path(tag.removeprefix("local-dir:")).expanduser() if tag else None
    if local is not None and (tag.startswith("local-dir:") or local.is_dir()):
        if not local.exists():
            raise FgembedError(f"weights not found: {local}")
        return f"dir:{local.name}:sha256:{_hash_files(local)}"
    return tag or "default"


def own_output(library_own, tokens: TokenForward | None, n_blocks: int, has_cls: bool, pooling: str,
               name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The output of a plain name: the library's own, or (`LoadOptions.pooling`) a pooling of the
    final block's tokens."""
    if pooling not in POOLINGS:
        raise FgembedError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if pooling == "pooled":
        return library_own
    if tokens is None:
        raise FgembedError(f"pooling {pooling!r} needs a token model; {name} gives pooled features only")
    one = readout([Variant(pooling=pooling)], library_own, tokens, n_blocks, has_cls, name)
    return lambda x: one(x)[0]


def split_size(name: str) -> tuple[str, int | None]:
    """`dinov2_vitl14~448` → (`dinov2_vitl14`, 448); a name without the suffix → (name, None).
    Only a `~<digits>` is a size (`hf:~/models/x` is a path); other variants stay in the name."""
    base, size, variant = split_name(name)
    return base + variant.suffix, size


def sized_name(name: str, image_size: int | None, native: int) -> str:
    """`name~size` for a non-native input size (so several sizes of one backbone sit in one store
    side by side); a name that already carries its suffix keeps it as written."""
    if split_name(name)[1] is not None or not image_size or image_size == native:
        return name
    return f"{name}~{image_size}"


_TO_TENSOR = ("ToTensor", "MaybeToTensor")  # torchvision's, and timm's / open_clip's PIL-or-tensor variant


def split_compose(transform) -> tuple[Callable[[Image.Image], torch.Tensor], tuple, tuple] | None:
    """Split a torchvision `Compose(..., ToTensor, Normalize)` (timm's and open_clip's eval
    transforms) into its own PIL steps ending in a uint8 CHW tensor, and the Normalize's mean/std.

    PIL resizes uint8 images to uint8, so `(geometric(img)/255 - mean)/std` is the transform's
    output up to float rounding. None when the pipeline has any other shape."""
    import torchvision.transforms as T

    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, T.Compose) or not steps or len(steps) < 2:
        return None
    *head, to_tensor, normalize = steps
    if type(to_tensor).__name__ not in _TO_TENSOR or not isinstance(normalize, T.Normalize):
        return None
    if any(type(step).__name__ in _TO_TENSOR or isinstance(step, T.Normalize) for step in head):
        return None
    mean = tuple(float(v) for v in torch.as_tensor(normalize.mean).flatten())
    std = tuple(float(v) for v in torch.as_tensor(normalize.std).flatten())
    return T.Compose([*head, T.PILToTensor()]), mean, std


def probe_image(size: tuple[int, int] = (97, 71)) -> Image.Image:
    """A seeded textured RGB image (a flat one hides resize and rounding differences)."""
    rng = np.random.default_rng(0)
    w, h = size
    ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
    pixels = np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def uint8_split_error(transform, geometric, mean, std, image: Image.Image) -> float:
    """Max |(geometric/255 - mean)/std - transform| on `image`, in uint8 levels of the input
    (inf when the split does not give a uint8 tensor of the transform's shape)."""
    want = transform(image)
    got = geometric(image)
    if got.dtype != torch.uint8 or got.shape != want.shape:
        return float("inf")
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    return float((((got.float() / 255 - m) / s - want).abs() * s * 255).max())


# A split is kept only when it reproduces the library's float transform up to float rounding (PIL
# and torchvision resize uint8 to uint8: exact). A library that resizes in float (DINOv3's image
# processor rescales first) would be moved by up to one uint8 level: its float transform is kept.
SPLIT_TOLERANCE_LEVELS = 0.01


def weights_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's floating weights are, and their dtype (the CPU and fp32 for a model with none)."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (weight.device, weight.dtype) if weight is not None else (torch.device("cpu"), torch.float32)


@dataclass
class Preprocessing:
    """A backbone's input side, resolved before (and without) its weights: all a decode worker
    needs, so workers can start while the models build. `load_backbone(…, preprocessing=…)`
    reuses it rather than resolving it again."""

    name: str  # the model's name, with `~size` where the size is not the model's own
    transform: Callable[[Image.Image], torch.Tensor]
    input_shape: tuple[int, ...]
    fingerprint: dict  # source, model, preprocessing, image policy, input shape
    geometric: Callable[[Image.Image], torch.Tensor] | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    state: object = None  # the library's own object the model build reads (data config, processor…)

    def key(self) -> str:
        """Equal keys mean equal transforms: the fingerprint describes the preprocessing fully."""
        fp = self.fingerprint
        return json.dumps([fp["source"], fp["preprocessing"], fp["input_shape"]], sort_keys=True)


def preprocessing(name: str, transform, fingerprint: dict, split: tuple | None = None,
                  state: object = None) -> Preprocessing:
    """Probe the transform once (the exact input shape, not a guess) and keep the uint8 split
    (`split` = (geometric, mean, std)) only if it reproduces the transform."""
    image = probe_image()
    probe = transform(image)
    fingerprint = {**fingerprint, "image_policy": IMAGE_POLICY, "input_shape": list(probe.shape)}
    if split is not None and uint8_split_error(transform, *split, image) > SPLIT_TOLERANCE_LEVELS:
        split = None
    geometric, mean, std = split or (None, (), ())
    return Preprocessing(name, transform, tuple(probe.shape), fingerprint, geometric, mean, std, state)


def finish(pre: Preprocessing, model: torch.nn.Module, own, convolutional: bool, fingerprint: dict,
           text_encoder=None, place: Placement = Placement(), tokens: TokenForward | None = None,
           n_blocks: int = 0, has_cls: bool = False) -> Backbone:
    """Place the model (after everything that changes its weights in fp32: checkpoint, position
    embedding resize), then probe its own output once for the dim."""
    model.eval().requires_grad_(False)
    place.apply(model)
    device, dtype = weights_device_dtype(model)
    with torch.inference_mode():
        dim = int(own(pre.transform(probe_image()).unsqueeze(0).to(device=device, dtype=dtype)).shape[-1])
    fingerprint = {**pre.fingerprint, **fingerprint}
    return Backbone(pre.name, model, pre.transform, own, dim, pre.input_shape, convolutional, fingerprint,
                    pre.geometric, pre.mean, pre.std, text_encoder, own, tokens, n_blocks, has_cls,
                    Variant(), pre.name, fingerprint)


def unsafe_pickle_line(path: Path, exc: BaseException) -> str | None:
    """The one line for a checkpoint torch refuses under `weights_only=True` (a pickled model or
    other Python objects), whichever wrapper the library raised it in; None for other errors."""
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
        return (f"{path} is not a safe torch file (it holds pickled Python objects, which torch refuses to load "
                "with weights_only=True); re-save it as torch.save(model.state_dict(), path) or as .safetensors")
    return None


def describe_mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], shown: int = 3) -> str | None:
    """One phrase naming missing, unexpected and wrongly-shaped keys (a few each, then a count);
    None when the checkpoint fits."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {list(got[k].shape)}≠{list(expected[k].shape)}" for k in expected
              if k in got and hasattr(got[k], "shape") and tuple(got[k].shape) != tuple(expected[k].shape)]

    def some(label: str, keys: list[str]) -> str:
        more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
        return f"{len(keys)} {label}: {', '.join(keys[:shown])}{more}"

    parts = [some(label, keys) for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                   ("of another shape", shapes)) if keys]
    return "; ".join(parts) or None
