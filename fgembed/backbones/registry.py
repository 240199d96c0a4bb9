"""Named specs, the source libraries' loaders, and the factory that resolves any name to a Backbone.

The reference five are written down here with the preprocessing their libraries apply, so the
README table and a reader of the code see the same thing; the numbers that reach the model
still come from the library at load time (tests check that the two agree where the library can
tell offline). `SOURCES` is both the list of source libraries and the dispatch.

A name may end in variant suffixes (`dinov2_vitl14~448~linear4~flip`, see `variants`): another
input size, layers, pooling or flip, each a group of its own. `load_preprocessing` resolves a
name's transform without its weights; `load_backbone` builds the model, reusing it.
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..errors import FgembedError
from .base import Backbone, LoadOptions, Placement, Preprocessing
from .variants import Variant, split_name

RANDOM_INIT_SEED = 0
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@dataclass(frozen=True)
class BackboneSpec:
    """Where a model comes from and what it outputs; documented preprocessing for reference."""

    name: str
    source: str  # a key of SOURCES
    model: str  # timm name, open_clip architecture, or Hugging Face repo / local folder
    weights: str | None = None  # timm tag is part of `model`; open_clip pretrained tag
    output: str = "pooled"
    dim: int | None = None
    input_size: int | None = None
    resize: str = ""
    interpolation: str = ""
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    description: str = ""


REFERENCE: dict[str, BackboneSpec] = {s.name: s for s in (
    BackboneSpec("dinov3_vitl16", "hf", "facebook/dinov3-vitl16-pretrain-lvd1689m", None, "pooled", 1024,
                 224, "squash to 224×224", "bilinear", *IMAGENET,
                 "DINOv3 ViT-L/16 (LVD-1689M); pooled = CLS after final norm"),
    BackboneSpec("dinov2_vitl14", "hf", "facebook/dinov2-large", None, "pooled", 1024,
                 224, "shortest edge 256, center crop 224", "bicubic", *IMAGENET,
                 "DINOv2 ViT-L/14 (LVD-142M); pooled = CLS after final norm"),
    BackboneSpec("convnextv2_large", "timm", "convnextv2_large.fcmae_ft_in22k_in1k", None, "pooled", 1536,
                 224, "shortest edge 256 (crop_pct 0.875), center crop 224", "bicubic", *IMAGENET,
                 "ConvNeXt V2-L, FCMAE pretrain, IN-22k→1k fine-tune; pooled = avg pool + norm"),
    BackboneSpec("openclip_vitl14", "open_clip", "ViT-L-14", "datacomp_xl_s13b_b90k", "pooled", 768,
                 224, "shortest edge 224, center crop 224", "bicubic", *OPENAI_CLIP,
                 "OpenCLIP ViT-L/14 on DataComp-XL; pooled = projected image embedding"),
    BackboneSpec("siglip_vitl16_256", "open_clip", "ViT-L-16-SigLIP-256", "webli", "pooled", 1024,
                 256, "squash to 256×256", "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                 "SigLIP ViT-L/16 at 256 px on WebLI; pooled = MAP-head image embedding"),
)}


@dataclass(frozen=True)
class Source:
    """One source library's adapter, imported on use (transformers alone takes seconds to import):
    its preprocessing resolved without weights, and the model build that reuses it."""

    module: str  # fgembed.backbones.<module>
    preprocessing: str  # (spec, name, options) → Preprocessing
    load: str  # (spec, name, options, pooling, place, preprocessing) → Backbone

    def call(self, what: str, spec: BackboneSpec, name: str, options: LoadOptions, *rest):
        module = importlib.import_module(f"fgembed.backbones.{self.module}")
        return getattr(module, getattr(self, what))(spec, name, options, *rest)


# source → adapter; the dispatch, and the list of source libraries.
SOURCES: dict[str, Source] = {
    "timm": Source("from_timm", "timm_preprocessing", "load_timm"),
    "open_clip": Source("from_openclip", "openclip_preprocessing", "load_openclip"),
    "hf": Source("from_hf", "hf_preprocessing", "load_hf"),
}
PREFIXES = tuple(f"{s}:" for s in SOURCES)


def list_backbones(pattern: str = "*") -> list[str]:
    """Reference names matching a shell pattern (any library model also works by prefix)."""
    return [n for n in REFERENCE if fnmatch.fnmatch(n, pattern)]


def resolve(name: str) -> BackboneSpec:
    """A reference name, or `timm:<model>`, `open_clip:<arch>/<tag>`, `hf:<org>/<repo>|<folder>`;
    any of them with variant suffixes (`~<size>`: the spec's `input_size` is then that size)."""
    base, size, _ = split_name(name)
    spec = _resolve_base(base)
    return replace(spec, name=name, input_size=size) if size else spec


def _resolve_base(name: str) -> BackboneSpec:
    if name in REFERENCE:
        return REFERENCE[name]
    source, _, rest = name.partition(":")
    if rest and source == "open_clip":
        if rest.startswith(("local-dir:", "hf-hub:")):  # open_clip's packaged configs carry their weights
            return BackboneSpec(name, "open_clip", rest)
        arch, _, tag = rest.partition("/")
        return BackboneSpec(name, "open_clip", arch, tag or None)
    if rest and source in SOURCES:
        return BackboneSpec(name, source, rest)
    close = difflib.get_close_matches(name, list(REFERENCE), n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise FgembedError(f"unknown backbone {name!r}; {hint}known: {', '.join(REFERENCE)}, "
                       f"or a prefixed name ({', '.join(p + '…' for p in PREFIXES)})")


def _model_options(name: str, options: LoadOptions | None) -> tuple[BackboneSpec, str, LoadOptions, Variant]:
    """(spec, the model's name: base and size, options with that size, the name's variant)."""
    options = options or LoadOptions()
    spec = resolve(name)
    base, size, variant = split_name(name)
    if options.pooling and not variant.plain:
        raise FgembedError(f"{name!r} names a variant: give its pooling in the name (e.g. {base}~mean~flip), "
                           "not as LoadOptions.pooling")
    if size and options.image_size and options.image_size != size:
        raise FgembedError(f"{name!r} names {size} px but --image-size is {options.image_size}")
    return spec, base + (f"~{size}" if size else ""), replace(options, image_size=size or options.image_size), variant


@contextlib.contextmanager
def _offline_guard(spec: BackboneSpec, name: str, options: LoadOptions) -> Iterator[None]:
    """With no network, weights not in the cache fail at once, before the library tries the hub,
    and a library failure on a half-filled cache is the same one line."""
    from_hub = options.pretrained and options.weights is None and not _local(spec)
    offline = from_hub and _go_offline_without_network()
    if offline and not _in_cache(spec, options.cache_dir):
        raise FgembedError(_offline_hint(name, options.cache_dir))
    try:
        yield
    except Exception as exc:  # the cache held the repo but not every file the library wants
        if offline and (not isinstance(exc, FgembedError) or str(exc).startswith("could not load")):
            raise FgembedError(_offline_hint(name, options.cache_dir)) from None
        raise


def load_preprocessing(name: str, options: LoadOptions | None = None) -> Preprocessing:
    """What `name`'s decode workers need (its library's transform, the uint8 split), resolved
    without building the model or touching its weights: seconds before the model is ready."""
    spec, model_name, options, _ = _model_options(name, options)
    with _offline_guard(spec, name, options):
        return SOURCES[spec.source].call("preprocessing", spec, model_name, options)


def load_backbone(name: str, options: LoadOptions | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, preprocessing: Preprocessing | None = None) -> Backbone:
    """Resolve `name` and build the model with its own library's preprocessing (`preprocessing`:
    as `load_preprocessing` resolved it already, not resolved again).

    `name~size` sets the input size (an `options.image_size` that disagrees is refused); the
    returned Backbone's `.name` carries the suffix whenever the size is not the model's own, and
    its variant suffixes (`~linear4`, `~mean`, `~flip`: see `variants`), which `embed` computes.
    With no network, weights that are not in the cache fail at once with one line saying how to
    fetch them elsewhere.

    `device` / `dtype`: where the weights end up, placed before this returns, so that loading
    several backbones in turn holds one model's fp32 weights on the host at a time, not all of
    them (open_clip's own `device=` where the library has one). The weights are those of a CPU
    build cast afterwards: random init is drawn on the CPU (seeded) and any checkpoint loaded in
    fp32, so the numbers equal loading on the CPU then `.to()`."""
    spec, model_name, options, variant = _model_options(name, options)
    pooling = options.pooling or spec.output
    place = Placement(torch.device(device) if device is not None else None, dtype)
    # Random init is seeded so every process and every resumed run builds the same model.
    with torch.random.fork_rng(devices=[]), _offline_guard(spec, name, options):
        torch.manual_seed(RANDOM_INIT_SEED)
        backbone = SOURCES[spec.source].call("load", spec, model_name, options, pooling, place, preprocessing)
    return backbone if variant.plain else backbone.variants([variant])[0]


def _local(spec: BackboneSpec) -> bool:
    """Weights on disk already: a Hugging Face folder or open_clip's `local-dir:` package."""
    model = spec.model.removeprefix("local-dir:")
    return spec.model.startswith("local-dir:") or (spec.source == "hf" and Path(model).expanduser().exists())


def _hub_repo(spec: BackboneSpec) -> str | None:
    """The Hugging Face repo the source library fetches the weights from (None: not the hub)."""
    if spec.source == "timm":
        import timm.models
        cfg = timm.models.get_pretrained_cfg(spec.model)
        return cfg.hf_hub_id if cfg else None
    if spec.source == "open_clip":
        if spec.model.startswith("hf-hub:"):
            return spec.model.removeprefix("hf-hub:")
        import open_clip
        hub = (open_clip.get_pretrained_cfg(spec.model, spec.weights) if spec.weights else {}).get("hf_hub", "")
        return os.path.split(hub)[0] or None  # open_clip's own split: `org/repo/` or `org/repo/file`
    return spec.model


def _in_cache(spec: BackboneSpec, cache_dir: Path | None) -> bool:
    """Whether any snapshot of the weights' repo is cached (the library then finds its files)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = _hub_repo(spec)
    if repo is None:
        return True  # a URL download: let the library try
    try:
        snapshot_download(repo, cache_dir=str(cache_dir) if cache_dir else None, local_files_only=True)
        return True
    except (LocalEntryNotFoundError, OSError, ValueError):
        return False


def _offline_hint(name: str, cache_dir: Path | None) -> str:
    where = f" in {cache_dir}" if cache_dir else " in the libraries' caches"
    return (f"no network, and the weights of {name} are not{where}: on a machine with internet run "
            f"`fgembed download --backbone {name} --cache-dir DIR`, copy DIR here, then pass --cache-dir DIR "
            "--offline (or --no-pretrained for a random init)")


def _go_offline_without_network(timeout: float = 5.0) -> bool:
    """True when the hub is out of reach (`--offline` / HF_HUB_OFFLINE, or one short probe fails):
    the Hugging Face hub client is then switched to its offline mode, so timm, open_clip and
    transformers read their caches at once instead of retrying for minutes."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        constants.HF_HUB_OFFLINE = True
        return True
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        return False
    except Exception:  # noqa: BLE001 — any transport failure (DNS, refused, timeout, proxy): no hub from here
        constants.HF_HUB_OFFLINE = True
        return True


def download_weights(name: str, cache_dir: Path | None) -> str:
    """Ask the source library to fetch `name`'s weights (and open_clip's tokenizer) into
    `cache_dir` (None: the library's own cache), exactly where a later `--cache-dir` load looks.
    Returns where they are; whatever the library raises while fetching is one FgembedError line."""
    spec = resolve(name)
    if _local(spec):
        return f"local, nothing to fetch: {spec.model}"
    try:
        return _fetch(spec, str(cache_dir) if cache_dir else None)
    except FgembedError:
        raise
    except Exception as exc:  # noqa: BLE001 — network, auth and disk errors of three libraries alike
        raise FgembedError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def _fetch(spec: BackboneSpec, cache: str | None) -> str:
    if spec.source == "timm":
        import timm
        model = timm.create_model(spec.model, pretrained=True, num_classes=0, cache_dir=cache)
        return f"timm {model.pretrained_cfg.get('hf_hub_id') or spec.model} in {cache or 'the Hugging Face cache'}"
    if spec.source == "open_clip":
        import open_clip
        if spec.model.startswith("hf-hub:"):
            from huggingface_hub import snapshot_download
            return snapshot_download(spec.model.removeprefix("hf-hub:"), cache_dir=cache)
        cfg = open_clip.get_pretrained_cfg(spec.model, spec.weights) if spec.weights else {}
        if not cfg:
            raise FgembedError(f"open_clip has no weights {spec.weights!r} for {spec.model}")
        path = open_clip.download_pretrained(cfg, cache_dir=cache)
        open_clip.get_tokenizer(spec.model, cache_dir=cache)  # SigLIP's tokenizer lives on the hub too
        return path
    from huggingface_hub import snapshot_download
    return snapshot_download(spec.model, cache_dir=cache)


def spec_table() -> list[dict]:
    return [asdict(s) for s in REFERENCE.values()]
