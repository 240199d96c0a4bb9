"""timm adapter: `create_model` + the model's own data config and eval transform.

The default output is timm's `forward_head(forward_features(x), pre_logits=True)`: exactly the
features the model's classifier would see; blocks' tokens (variants) come from timm's own
`forward_intermediates`. The transform is resolved first from a model built on the meta device,
so decode workers can start before the weights exist. A `--weights` checkpoint loads into the headless model
(`num_classes=0`): a feature extractor's checkpoint and a fine-tune's with any class count both
fit, their classifier is dropped; any other difference is named, key by key.
"""
from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import timm
import timm.data
import timm.models
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


def _create(model_name: str, options: LoadOptions) -> torch.nn.Module:
    kwargs: dict = {"num_classes": 0} if options.weights is not None else {}
    if options.cache_dir is not None:
        kwargs["cache_dir"] = str(options.cache_dir)
    try:
        return timm.create_model(model_name, pretrained=options.pretrained and options.weights is None, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            close = timm.list_models(f"*{model_name.split('.')[0][:8]}*")[:5]
            raise FgembedError(f"unknown timm model {model_name!r}; close: {', '.join(close) or 'none'}") from None
        raise FgembedError(f"could not load timm model {model_name!r}: {str(exc).splitlines()[0]}") from None


def load_checkpoint_headless(model: torch.nn.Module, path: Path, label: str) -> None:
    """Load a user's checkpoint into a model built with `num_classes=0`.

    timm's `load_state_dict` reads the file as timm writes it (EMA / `state_dict` / `model`
    wrappers, DDP and compile prefixes); the classifier's keys (named by the model's pretrained
    config) are dropped whatever their class count; every other key must match in name and shape."""
    if not Path(path).is_file():
        raise FgembedError(f"weights not found: {path}")
    try:
        state = timm.models.load_state_dict(str(path))
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError) as exc:
        line = unsafe_pickle_line(path, exc) or f"could not read {path}: {str(exc).splitlines()[0]}"
        raise FgembedError(line) from None
    classifiers = model.pretrained_cfg.get("classifier") or ()
    for name in (classifiers,) if isinstance(classifiers, str) else classifiers:
        state.pop(f"{name}.weight", None)
        state.pop(f"{name}.bias", None)
    mismatch = describe_mismatch(model.state_dict(), state)
    if mismatch:
        raise FgembedError(f"checkpoint {Path(path).name} does not fit {label} (headless): {mismatch}")
    model.load_state_dict(state)


def _sized(model: torch.nn.Module, options: LoadOptions) -> dict:
    """The model's data config, at `--image-size` where one is given (ViTs: position embeddings
    resampled to the new grid, by timm)."""
    config = timm.data.resolve_model_data_config(model)
    if options.image_size:
        if hasattr(model, "set_input_size"):
            model.set_input_size(img_size=options.image_size)
        config["input_size"] = (3, options.image_size, options.image_size)
    return config


def timm_preprocessing(spec: BackboneSpec, name: str, options: LoadOptions) -> Preprocessing:
    """timm's eval transform from the model's own data config, read off a model built on the meta
    device (structure only: no weights drawn or loaded, ~0.1 s for a ViT-L)."""
    model_name = spec.model
    with torch.device("meta"):
        model = _create(model_name, replace(options, pretrained=False))
    config = timm.data.resolve_model_data_config(model)
    name = sized_name(name, options.image_size, config["input_size"][-1])
    config = _sized(model, options)
    transform = timm.data.create_transform(**config, is_training=False)
    fingerprint = {"source": "timm", "model": model_name,
                   "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}
    return preprocessing(name, transform, fingerprint, split_compose(transform), config)


def _tokens(model: torch.nn.Module):
    """timm's `forward_intermediates`: the blocks' tokens after the final norm, split into prefix
    and patch tokens, and the model's own output from the same pass."""
    def forward(x: torch.Tensor, blocks, own: bool):
        final, inter = model.forward_intermediates(x, indices=list(blocks), norm=True, output_fmt="NLC",
                                                   return_prefix_tokens=True)
        pairs = [(t[1], t[0]) if isinstance(t, tuple) else (None, t) for t in inter]
        return (model.forward_head(final, pre_logits=True) if own else None), dict(zip(blocks, pairs))
    return forward


def load_timm(spec: BackboneSpec, name: str, options: LoadOptions, pooling: str, place: Placement,
              pre: Preprocessing | None = None) -> Backbone:
    """Built on the CPU as timm builds it (seeded random init, then any checkpoint, then the position
    embedding resize, all in fp32), placed by `finish` before the caller builds the next model. Not
    timm's `device=` build: that draws the random init on the target, other numbers than the CPU's."""
    model_name = spec.model
    pre = pre or timm_preprocessing(spec, name, options)
    model = _create(model_name, options)
    if options.pretrained and options.weights is not None:
        load_checkpoint_headless(model, options.weights, f"timm model {model_name!r}")
    if _sized(model, options) != pre.state:
        raise FgembedError(f"timm model {model_name!r} built with another data config than its preprocessing "
                           "was resolved from; report this")
    convolutional = getattr(model, "num_prefix_tokens", None) is None
    has_tokens = not convolutional and hasattr(model, "forward_intermediates") and hasattr(model, "blocks")
    tokens = _tokens(model) if has_tokens else None
    n_blocks = len(model.blocks) if has_tokens else 0
    has_cls = getattr(model, "cls_token", None) is not None

    def library_own(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)

    fingerprint = {
        "weights": weights_id(options, model.pretrained_cfg.get("hf_hub_id") or model_name),
        "pooling": pooling,
        "versions": library_versions("timm"),
    }
    own = own_output(library_own, tokens, n_blocks, has_cls, pooling, pre.name)
    return finish(pre, model, own, convolutional, fingerprint, place=place, tokens=tokens, n_blocks=n_blocks,
                  has_cls=has_cls)
