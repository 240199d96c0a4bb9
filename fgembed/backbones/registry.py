"""Named backbone specs and the factory that resolves any name to a loaded Backbone.

The reference five are written down here with the preprocessing their libraries apply, so the
README table and a reader of the code see the same thing; the numbers that reach the model
still come from the library at load time (tests check that the two agree where the library can
tell offline).
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass

import torch

from ..errors import FgembedError
from .base import Backbone, LoadOptions

PREFIXES = ("timm:", "open_clip:", "hf:")
RANDOM_INIT_SEED = 0
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@dataclass(frozen=True)
class BackboneSpec:
    """Where a model comes from and what it outputs; documented preprocessing for reference."""

    name: str
    source: str  # "timm" | "open_clip" | "hf"
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


def resolve(name: str) -> BackboneSpec:
    """A reference name, or `timm:<model>`, `open_clip:<arch>/<tag>`, `hf:<org>/<repo>|<folder>`."""
    if name in REFERENCE:
        return REFERENCE[name]
    source, _, rest = name.partition(":")
    if rest and source == "timm":
        return BackboneSpec(name, "timm", rest)
    if rest and source == "open_clip":
        if rest.startswith(("local-dir:", "hf-hub:")):  # open_clip's packaged configs carry their weights
            return BackboneSpec(name, "open_clip", rest)
        arch, _, tag = rest.partition("/")
        return BackboneSpec(name, "open_clip", arch, tag or None)
    if rest and source == "hf":
        return BackboneSpec(name, "hf", rest)
    close = difflib.get_close_matches(name, list(REFERENCE), n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise FgembedError(f"unknown backbone {name!r}; {hint}known: {', '.join(REFERENCE)}, "
                       f"or a prefixed name ({', '.join(p + '…' for p in PREFIXES)})")


def load_backbone(name: str, options: LoadOptions | None = None) -> Backbone:
    """Resolve `name` and build the model with its own library's preprocessing."""
    options = options or LoadOptions()
    spec = resolve(name)
    pooling = options.pooling or spec.output
    # Random init is seeded so every process and every resumed run builds the same model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        if spec.source == "timm":
            from .from_timm import load_timm
            return load_timm(name, spec.model, options, pooling)
        if spec.source == "open_clip":
            from .from_openclip import load_openclip
            return load_openclip(name, spec.model, spec.weights, options, pooling)
        from .from_hf import load_hf
        return load_hf(name, spec.model, options, pooling)


def spec_table() -> list[dict]:
    return [asdict(s) for s in REFERENCE.values()]
