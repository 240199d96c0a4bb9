"""timm adapter: `create_model` + the model's own data config and eval transform.

The default output is timm's `forward_head(forward_features(x), pre_logits=True)`: exactly the
features the model's classifier would see.
"""
from __future__ import annotations

import timm
import timm.data
import torch

from ..errors import FgembedError
from .base import Backbone, LoadOptions, check_pooling, finish, library_versions, pool_tokens, weights_id


def load_timm(name: str, model_name: str, options: LoadOptions, pooling: str) -> Backbone:
    kwargs: dict = {}
    if options.weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(options.weights)}
    if options.cache_dir is not None:
        kwargs["cache_dir"] = str(options.cache_dir)
    try:
        model = timm.create_model(model_name, pretrained=options.pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            close = timm.list_models(f"*{model_name.split('.')[0][:8]}*")[:5]
            raise FgembedError(f"unknown timm model {model_name!r}; close: {', '.join(close) or 'none'}") from None
        raise FgembedError(f"could not load timm model {model_name!r}: {str(exc).splitlines()[0]}") from None
    config = timm.data.resolve_model_data_config(model)
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
    return finish(name, model, transform, embed, convolutional, fingerprint)
