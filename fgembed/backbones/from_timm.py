"""timm adapter: `create_model` + the model's own data config and eval transform.

The default output is timm's `forward_head(forward_features(x), pre_logits=True)`: exactly the
features the model's classifier would see. A `--weights` checkpoint loads into the headless model
(`num_classes=0`): a feature extractor's checkpoint and a fine-tune's with any class count both
fit, their classifier is dropped; any other difference is named, key by key.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import timm
import timm.data
import timm.models
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
    pool_tokens,
    sized_name,
    split_compose,
    unsafe_pickle_line,
    weights_id,
)


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


def load_timm(name: str, model_name: str, options: LoadOptions, pooling: str, place: Placement) -> Backbone:
    """Built on the CPU as timm builds it (seeded random init, then any checkpoint, then the position
    embedding resize, all in fp32), placed by `finish` before the caller builds the next model. Not
    timm's `device=` build: that draws the random init on the target, other numbers than the CPU's."""
    model = _create(model_name, options)
    if options.pretrained and options.weights is not None:
        load_checkpoint_headless(model, options.weights, f"timm model {model_name!r}")
    config = timm.data.resolve_model_data_config(model)
    name = sized_name(name, options.image_size, config["input_size"][-1])
    if options.image_size:
        if hasattr(model, "set_input_size"):  # ViTs: resample position embeddings to the new grid
            model.set_input_size(img_size=options.image_size)
        config["input_size"] = (3, options.image_size, options.image_size)
    transform = timm.data.create_transform(**config, is_training=False)
    has_tokens = getattr(model, "num_prefix_tokens", None) is not None
    check_pooling(pooling, has_tokens, name)

    def embed(x: torch.Tensor) -> torch.Tensor:
        features = model.forward_features(x)
        if pooling == "pooled":
            return model.forward_head(features, pre_logits=True)
        return pool_tokens(features, pooling, model.num_prefix_tokens)

    fingerprint = {
        "source": "timm",
        "model": model_name,
        "weights": weights_id(options, model.pretrained_cfg.get("hf_hub_id") or model_name),
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "pooling": pooling,
        "versions": library_versions("timm"),
    }
    convolutional = not has_tokens
    return finish(name, model, transform, embed, convolutional, fingerprint, split_compose(transform),
                  place=place)
