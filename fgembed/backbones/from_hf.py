"""Hugging Face transformers adapter: `AutoModel` + `AutoImageProcessor` from one repo or folder.

The default output is the model's `pooler_output` (for DINOv2/DINOv3: the CLS token after the
final layer norm). Mean pooling skips the CLS and register tokens.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from ..errors import FgembedError
from .base import Backbone, LoadOptions, check_pooling, finish, library_versions, pool_tokens, weights_id


def _resize_processor(processor, size: int) -> None:
    """Override the processor's output size, keeping its resize/crop ratio."""
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop:
        short = processor.size.get("shortest_edge")
        ratio = short / crop["height"] if short else 1.0
        processor.crop_size = {"height": size, "width": size}
        processor.size = {"shortest_edge": round(size * ratio)}
    else:
        processor.size = {"height": size, "width": size}


def load_hf(name: str, repo: str, options: LoadOptions, pooling: str) -> Backbone:
    source = str(options.weights) if options.weights else repo
    cache = str(options.cache_dir) if options.cache_dir else None
    try:
        processor = AutoImageProcessor.from_pretrained(source, cache_dir=cache)
        if options.pretrained:
            model = AutoModel.from_pretrained(source, cache_dir=cache, dtype=torch.float32)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(source, cache_dir=cache))
    except (OSError, ValueError) as exc:
        raise FgembedError(f"could not load Hugging Face model {source!r}: {str(exc).splitlines()[0]}") from None
    if options.image_size:
        _resize_processor(processor, options.image_size)
    check_pooling(pooling, True, name)
    n_prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)

    def transform(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    def embed(x: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=x)
        if pooling == "pooled":
            return out.pooler_output
        return pool_tokens(out.last_hidden_state, pooling, n_prefix)

    settings = {k: v for k, v in processor.to_dict().items() if not k.startswith("_")}
    fingerprint = {
        "source": "transformers",
        "model": repo,
        "weights": weights_id(options, repo),
        "preprocessing": settings,
        "pooling": pooling,
        "versions": library_versions("transformers"),
    }
    return finish(name, model, transform, embed, False, fingerprint)
