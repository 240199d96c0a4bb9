"""open_clip adapter: `create_model_and_transforms` + `encode_image`.

open_clip keeps each pretrained tag's preprocessing beside its weights; with random init we
still take the tag's preprocessing so the two cannot drift (SigLIP's mean/std differ from CLIP's).
"""
from __future__ import annotations

import difflib

import open_clip
import torch

from ..errors import FgembedError
from .base import Backbone, LoadOptions, check_pooling, finish, library_versions, weights_id

SCHEMAS = ("local-dir:", "hf-hub:")


def load_openclip(name: str, arch: str, tag: str | None, options: LoadOptions, pooling: str) -> Backbone:
    check_pooling(pooling, False, name)
    schema = arch.startswith(SCHEMAS)  # open_clip's own `local-dir:` / `hf-hub:` packaging
    if not schema and arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
        raise FgembedError(f"unknown open_clip model {arch!r}; close: {', '.join(close) or 'none'}")
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag) if tag and not schema else {}
    if options.pretrained and options.weights is None and tag and not tag_cfg:
        tags = [t for a, t in open_clip.list_pretrained() if a == arch]
        raise FgembedError(f"open_clip has no weights {tag!r} for {arch}; known: {', '.join(tags) or 'none'}")
    preprocess_cfg = {
        key: tag_cfg[src] for key, src in (("image_mean", "mean"), ("image_std", "std"),
                                           ("image_interpolation", "interpolation"),
                                           ("image_resize_mode", "resize_mode")) if src in tag_cfg
    }
    pretrained = (str(options.weights) if options.weights else tag) if options.pretrained else None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, load_weights=options.pretrained, force_image_size=options.image_size,
            cache_dir=str(options.cache_dir) if options.cache_dir else None, **preprocess_cfg)
    except (RuntimeError, OSError, ValueError) as exc:
        raise FgembedError(f"could not load open_clip {arch} ({pretrained}): {str(exc).splitlines()[0]}") from None

    def embed(x: torch.Tensor) -> torch.Tensor:
        return model.encode_image(x)

    fingerprint = {
        "source": "open_clip",
        "model": arch,
        "weights": weights_id(options, tag),
        "preprocessing": repr(preprocess),
        "pooling": pooling,
        "versions": library_versions("open_clip_torch"),
    }
    convolutional = not hasattr(model.visual, "transformer") and not hasattr(model.visual, "trunk")
    return finish(name, model, preprocess, embed, convolutional, fingerprint)
