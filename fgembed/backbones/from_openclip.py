"""open_clip adapter: `create_model_and_transforms` + `encode_image`, and the text tower.

open_clip keeps each pretrained tag's preprocessing beside its weights; with random init we
still take the tag's preprocessing so the two cannot drift (SigLIP's mean/std differ from CLIP's).
A `--weights` file loads through open_clip's own `load_checkpoint` (its format conversions
included); a file that is not a safe torch file, or whose keys differ, is one line naming why.
"""
from __future__ import annotations

import difflib
import functools
import pickle
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch

from ..errors import FgembedError
from .base import (
    Backbone,
    LoadOptions,
    Placement,
    check_pooling,
    describe_mismatch,
    finish,
    library_versions,
    sized_name,
    split_compose,
    unsafe_pickle_line,
    weights_id,
)

SCHEMAS = ("local-dir:", "hf-hub:")


def load_weights_file(model: torch.nn.Module, path: Path, arch: str) -> None:
    """open_clip's `load_checkpoint` (weights_only torch.load, 3rd-party key conversion, position
    embedding resize), with its two common failures turned into one line each."""
    if not Path(path).is_file():
        raise FgembedError(f"weights not found: {path}")
    try:
        open_clip.load_checkpoint(model, str(path))
    except (pickle.UnpicklingError, RuntimeError) as exc:
        if line := unsafe_pickle_line(path, exc):
            raise FgembedError(line) from None
        state = open_clip.factory.load_state_dict(str(path))
        mismatch = describe_mismatch(model.state_dict(), state) or str(exc).splitlines()[0]
        raise FgembedError(f"checkpoint {Path(path).name} does not fit open_clip {arch}: {mismatch}") from None


def _native_size(arch: str) -> int:
    config = open_clip.get_model_config(arch) or {}
    size = config.get("vision_cfg", {}).get("image_size", 0)
    return size if isinstance(size, int) else size[0]


def load_openclip(name: str, arch: str, tag: str | None, options: LoadOptions, pooling: str,
                  place: Placement) -> Backbone:
    """open_clip's own `device=` placement: it builds on the CPU (seeded random init), moves the
    model to the device, then loads the checkpoint into it; `finish` casts it there."""
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
    from_file = options.pretrained and options.weights is not None
    pretrained = tag if options.pretrained and not from_file else None
    cache_dir = str(options.cache_dir) if options.cache_dir else None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, load_weights=options.pretrained and not from_file,
            force_image_size=options.image_size, cache_dir=cache_dir, device=place.device or "cpu", **preprocess_cfg)
    except (RuntimeError, OSError, ValueError) as exc:
        raise FgembedError(f"could not load open_clip {arch} ({pretrained}): {str(exc).splitlines()[0]}") from None
    if from_file:
        load_weights_file(model, options.weights, arch)
    name = sized_name(name, options.image_size, 0 if schema else _native_size(arch))

    def embed(x: torch.Tensor) -> torch.Tensor:
        return model.encode_image(x)

    @functools.cache
    def tokenizer():  # built on first use: SigLIP's comes from the hub, an image-only job never needs it
        try:
            return open_clip.get_tokenizer(arch, cache_dir=cache_dir)
        except (OSError, ValueError) as exc:
            raise FgembedError(f"could not load the tokenizer of open_clip {arch}: {str(exc).splitlines()[0]}") from None

    def text_encoder(class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """[C, dim]: open_clip's own zero-shot classifier (prompts encoded, normalised, averaged
        per class, normalised again)."""
        device = next(model.parameters()).device
        weights = open_clip.build_zero_shot_classifier(model, tokenizer(), list(class_names), list(templates),
                                                       device=device)
        return weights.T

    fingerprint = {
        "source": "open_clip",
        "model": arch,
        "weights": weights_id(options, tag or (arch if schema else None)),  # local-dir: weights hashed
        "preprocessing": repr(preprocess),
        "pooling": pooling,
        "versions": library_versions("open_clip_torch"),
    }
    convolutional = not hasattr(model.visual, "transformer") and not hasattr(model.visual, "trunk")
    return finish(name, model, preprocess, embed, convolutional, fingerprint, split_compose(preprocess),
                  text_encoder, place)
