"""open_clip adapter: `create_model_and_transforms` + `encode_image`, and the text tower.

open_clip keeps each pretrained tag's preprocessing beside its weights; with random init we
still take the tag's preprocessing so the two cannot drift (SigLIP's mean/std differ from CLIP's).
Blocks' tokens (variants) come from open_clip's own `forward_intermediates`, for its ViT towers.
A `--weights` file loads through open_clip's own `load_checkpoint` (its format conversions
included); a file that is not a safe torch file, or whose keys differ, is one line naming why.
"""
from __future__ import annotations

import difflib
import functools
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import open_clip
import torch

from ..errors import FgembedError
from .base import (
    Backbone,
    LoadOptions,
    Placement,
    Preprocessing,
    describe_mismatch,
    finish,
    library_versions,
    own_output,
    preprocessing,
    sized_name,
    split_compose,
    unsafe_pickle_line,
    weights_id,
)

if TYPE_CHECKING:
    from .registry import BackboneSpec

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


def _check(name: str, arch: str, tag: str | None, options: LoadOptions) -> tuple[bool, dict, dict]:
    """(open_clip's own packaging?, the tag's pretrained config, its preprocessing settings);
    an unknown architecture or tag is one line naming close ones."""
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
    return schema, tag_cfg, preprocess_cfg


def _create(arch: str, pretrained: str | None, load_weights: bool, options: LoadOptions, device, preprocess_cfg):
    try:
        return open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, load_weights=load_weights, force_image_size=options.image_size,
            cache_dir=str(options.cache_dir) if options.cache_dir else None, device=device, **preprocess_cfg)
    except (RuntimeError, OSError, ValueError) as exc:
        raise FgembedError(f"could not load open_clip {arch} ({pretrained}): {str(exc).splitlines()[0]}") from None


def openclip_preprocessing(spec: BackboneSpec, name: str, options: LoadOptions) -> Preprocessing:
    """The tag's (or package's) own preprocess, read off a model built on the meta device
    (structure only: no weights drawn or loaded)."""
    arch, tag = spec.model, spec.weights
    schema, _, preprocess_cfg = _check(name, arch, tag, options)
    with torch.device("meta"):
        _, _, preprocess = _create(arch, None, False, options, "meta", preprocess_cfg)
    name = sized_name(name, options.image_size, 0 if schema else _native_size(arch))
    fingerprint = {"source": "open_clip", "model": arch, "preprocessing": repr(preprocess)}
    return preprocessing(name, preprocess, fingerprint, split_compose(preprocess))


def _tokens(model: torch.nn.Module):
    """open_clip's `forward_intermediates`: the blocks' tokens after the final norm (`ln_post`, or
    the timm trunk's norm), prefix and patch tokens apart, and `encode_image` from the same pass."""
    def forward(x: torch.Tensor, blocks, own: bool):
        out = model.forward_intermediates(image=x, image_indices=list(blocks), normalize=False,
                                          normalize_intermediates=True, intermediates_only=not own,
                                          image_output_fmt="NLC", image_output_extra_tokens=True)
        prefix = out.get("image_intermediates_prefix") or [None] * len(blocks)
        return out.get("image_features"), dict(zip(blocks, zip(prefix, out["image_intermediates"])))
    return forward


def _token_layout(visual: torch.nn.Module) -> tuple[int, bool]:
    """(blocks, has a CLS token) of a ViT image tower, (0, False) for a convolutional one."""
    if hasattr(visual, "transformer") and hasattr(visual, "forward_intermediates"):
        return len(visual.transformer.resblocks), True  # open_clip's ViT: one class token, always
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "blocks") and hasattr(visual, "forward_intermediates"):
        return len(trunk.blocks), getattr(trunk, "cls_token", None) is not None
    return 0, False


def load_openclip(spec: BackboneSpec, name: str, options: LoadOptions, pooling: str, place: Placement,
                  pre: Preprocessing | None = None) -> Backbone:
    """open_clip's own `device=` placement: it builds on the CPU (seeded random init), moves the
    model to the device, then loads the checkpoint into it; `finish` casts it there."""
    arch, tag = spec.model, spec.weights
    pre = pre or openclip_preprocessing(spec, name, options)
    schema, _, preprocess_cfg = _check(name, arch, tag, options)
    from_file = options.pretrained and options.weights is not None
    pretrained = tag if options.pretrained and not from_file else None
    cache_dir = str(options.cache_dir) if options.cache_dir else None
    model, _, _ = _create(arch, pretrained, options.pretrained and not from_file, options, place.device or "cpu",
                          preprocess_cfg)
    if from_file:
        load_weights_file(model, options.weights, arch)

    def library_own(x: torch.Tensor) -> torch.Tensor:
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
        "weights": weights_id(options, tag or (arch if schema else None)),  # local-dir: weights hashed
        "pooling": pooling,
        "versions": library_versions("open_clip_torch"),
    }
    n_blocks, has_cls = _token_layout(model.visual)
    tokens = _tokens(model) if n_blocks else None
    convolutional = not hasattr(model.visual, "transformer") and not hasattr(model.visual, "trunk")
    own = own_output(library_own, tokens, n_blocks, has_cls, pooling, pre.name)
    return finish(pre, model, own, convolutional, fingerprint, text_encoder, place, tokens, n_blocks, has_cls)
