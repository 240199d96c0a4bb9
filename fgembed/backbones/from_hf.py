"""Hugging Face transformers adapter: `AutoModel` + `AutoImageProcessor` from one repo or folder.

The default output is the model's `pooler_output` (for DINOv2/DINOv3: the CLS token after the
final layer norm). Mean pooling skips the CLS and register tokens.

The reference repos' architectures are also known offline (`OFFLINE`): with `--no-pretrained`
they build from transformers' own config and image-processor classes, never touching the hub.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    BitImageProcessor,
    Dinov2Config,
    DINOv3ViTConfig,
    DINOv3ViTImageProcessor,
)
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    PILImageResampling,
)

from ..errors import FgembedError
from .base import (
    Backbone,
    LoadOptions,
    Placement,
    check_pooling,
    finish,
    library_versions,
    pool_tokens,
    probe_image,
    sized_name,
    weights_id,
)

# repo → (config, image processor), with the sizes written in each checkpoint's config.json and
# preprocessor_config.json on the hub (tests check them against timm's offline definitions of the
# same networks). Anything not set here is the config class's own default, as in those files.
OFFLINE: dict[str, tuple[Callable, Callable]] = {
    "facebook/dinov2-large": (
        lambda: Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                             image_size=518, patch_size=14, layerscale_value=1.0, layer_norm_eps=1e-6),
        lambda: BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                  do_center_crop=True, resample=PILImageResampling.BICUBIC,
                                  image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)),
    "facebook/dinov3-vitl16-pretrain-lvd1689m": (
        lambda: DINOv3ViTConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, patch_size=16, num_register_tokens=4, image_size=224),
        lambda: DINOv3ViTImageProcessor(size={"height": 224, "width": 224}, resample=PILImageResampling.BILINEAR,
                                        image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)),
}
# Config keys a `--weights` folder must share with the reference architecture it stands in for.
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                     "num_register_tokens")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


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


def check_folder(folder: Path, pretrained: bool, reference: str | None) -> None:
    """A local folder must be a Hugging Face image model folder (and, standing in for a reference
    repo, of that repo's architecture): one line naming the first thing that does not match."""
    if not folder.is_dir():
        raise FgembedError(f"weights not found: {folder} (a Hugging Face model folder)")
    needed = ["config.json", "preprocessor_config.json"]
    missing = [f for f in needed if not (folder / f).is_file()]
    if pretrained and not any((folder / f).is_file() for f in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES[::2]))
    if missing:
        raise FgembedError(f"{folder} is not a complete Hugging Face model folder: no {', no '.join(missing)}")
    if reference in OFFLINE:
        want = OFFLINE[reference][0]().to_dict()
        got = AutoConfig.from_pretrained(folder).to_dict()
        differ = [f"{k} {got.get(k)!r} (needs {want[k]!r})" for k in ARCHITECTURE_KEYS if k in want and got.get(k) != want[k]]
        if differ:
            raise FgembedError(f"{folder}/config.json is not the architecture of {reference}: {'; '.join(differ)}")


def _load(source: str, options: LoadOptions, reference: str | None):
    """(processor, model): from a folder or the hub; an offline-known repo without weights never
    touches the hub. `from_pretrained` builds on the meta device and fills the weights on the host
    (one fp32 copy, no random init underneath); `finish` then places it. transformers' `device_map`
    would fill the target directly but needs `accelerate`, which fgembed does not depend on."""
    cache = str(options.cache_dir) if options.cache_dir else None
    if not options.pretrained and options.weights is None and source in OFFLINE:
        config, processor = OFFLINE[source]
        return processor(), AutoModel.from_config(config())
    if Path(source).exists() or options.weights is not None:
        check_folder(Path(source), options.pretrained, reference)
    processor = AutoImageProcessor.from_pretrained(source, cache_dir=cache)
    if not options.pretrained:
        return processor, AutoModel.from_config(AutoConfig.from_pretrained(source, cache_dir=cache))
    model, info = AutoModel.from_pretrained(source, cache_dir=cache, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        keys = [k if isinstance(k, str) else k[0] for v in bad.values() for k in v]
        raise FgembedError(f"the weights in {source} do not fit its config.json: {len(keys)} "
                           f"{' / '.join(k.split('_')[0] for k in bad)} keys: {', '.join(keys[:3])}"
                           + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""))
    return processor, model


def load_hf(name: str, repo: str, options: LoadOptions, pooling: str, place: Placement) -> Backbone:
    source = str(options.weights) if options.weights else repo
    try:
        processor, model = _load(source, options, repo if options.weights else None)
    except (OSError, ValueError, RuntimeError) as exc:
        raise FgembedError(f"could not load Hugging Face model {source!r}: {str(exc).splitlines()[0]}") from None
    if "pixel_values" not in inspect.signature(model.forward).parameters:
        raise FgembedError(f"{source} holds a {model.config.model_type!r} model ({type(model).__name__}), "
                           "which takes no images")

    def transform(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    name = sized_name(name, options.image_size, transform(probe_image()).shape[-1])
    if options.image_size:
        _resize_processor(processor, options.image_size)
    check_pooling(pooling, True, name)
    n_prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)

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
    return finish(name, model, transform, embed, False, fingerprint, _split(processor), place=place)


def _split(processor) -> tuple | None:
    """The processor's own resize/crop without its rescale and normalise (a uint8 tensor), and its
    mean/std; None where it does not rescale by 1/255 then normalise. `finish` keeps the split only
    if it reproduces the full output (not DINOv3's: its processor resizes in float)."""
    if not (getattr(processor, "do_rescale", False) and getattr(processor, "do_normalize", False)
            and abs(getattr(processor, "rescale_factor", 0) - 1 / 255) < 1e-9):
        return None

    def geometric(image):
        return processor(images=image, return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"][0]

    return geometric, tuple(map(float, processor.image_mean)), tuple(map(float, processor.image_std))
