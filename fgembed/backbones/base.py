"""What every adapter returns: a model with its own preprocessing and embedding function."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..devices import release_freed_host_memory
from ..errors import FgembedError
from ..images import IMAGE_POLICY

POOLINGS = ("pooled", "cls", "mean", "cls+mean")


@dataclass
class LoadOptions:
    """How to materialise a spec: these all change the numbers and enter the fingerprint."""

    pretrained: bool = True
    weights: Path | None = None  # a local checkpoint (file, or a directory for Hugging Face)
    image_size: int | None = None
    pooling: str | None = None  # None: the spec's own output
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
    """A frozen model ready for extraction.

    `transform` maps one decoded RGB PIL image to the model's input tensor (the source library's
    own eval preprocessing); `embed` maps a batch of those to [B, dim] embeddings.
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

    @property
    def has_text(self) -> bool:
        return self.text_encoder is not None

    def preprocessing_key(self) -> str:
        """Equal keys mean equal transforms: the fingerprint describes the preprocessing fully."""
        fp = self.fingerprint
        return json.dumps([fp["source"], fp["preprocessing"], fp["input_shape"]], sort_keys=True)


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


def check_pooling(pooling: str, has_tokens: bool, name: str) -> None:
    if pooling not in POOLINGS:
        raise FgembedError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if pooling != "pooled" and not has_tokens:
        raise FgembedError(f"pooling {pooling!r} needs a token model; {name} gives pooled features only")


def pool_tokens(tokens: torch.Tensor, pooling: str, n_prefix: int) -> torch.Tensor:
    """CLS, mean of patch tokens (prefix/register tokens excluded), or both concatenated."""
    cls = tokens[:, 0]
    mean = tokens[:, n_prefix:].mean(dim=1)
    return {"cls": cls, "mean": mean, "cls+mean": torch.cat([cls, mean], dim=1)}[pooling]


def split_size(name: str) -> tuple[str, int | None]:
    """`dinov2_vitl14~448` → (`dinov2_vitl14`, 448); a name without the suffix → (name, None).
    Only a trailing `~<digits>` is a size (`hf:~/models/x` is a path)."""
    base, sep, size = name.rpartition("~")
    if not sep or "/" in size:
        return name, None
    if not size.isdigit() or int(size) < 1:
        raise FgembedError(f"{name!r}: after '~' comes an image size in pixels, e.g. {base}~448")
    return base, int(size)


def sized_name(name: str, image_size: int | None, native: int) -> str:
    """`name~size` for a non-native input size (so several sizes of one backbone sit in one store
    side by side); a name that already carries its suffix keeps it as written."""
    if split_size(name)[1] is not None or not image_size or image_size == native:
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


def finish(name: str, model: torch.nn.Module, transform, embed, convolutional: bool, fingerprint: dict,
           split: tuple | None = None, text_encoder=None, place: Placement = Placement()) -> Backbone:
    """Place the model (after everything that changes its weights in fp32: checkpoint, position
    embedding resize), then probe the transform and model once: the exact input shape and output
    dim, not a guess; and keep the uint8 split (`split` = (geometric, mean, std)) only if it
    reproduces the transform."""
    model.eval().requires_grad_(False)
    place.apply(model)
    device, dtype = weights_device_dtype(model)
    image = probe_image()
    probe = transform(image)
    with torch.inference_mode():
        dim = int(embed(probe.unsqueeze(0).to(device=device, dtype=dtype)).shape[-1])
    fingerprint = {**fingerprint, "image_policy": IMAGE_POLICY, "input_shape": list(probe.shape)}
    if split is not None and uint8_split_error(transform, *split, image) > SPLIT_TOLERANCE_LEVELS:
        split = None
    geometric, mean, std = split or (None, (), ())
    return Backbone(name, model, transform, embed, dim, tuple(probe.shape), convolutional, fingerprint,
                    geometric, mean, std, text_encoder)


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
