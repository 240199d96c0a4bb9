"""Hugging Face transformers adapter: `AutoModel` + `AutoImageProcessor` from one repo or folder.

The default output is the model's `pooler_output` (for DINOv2/DINOv3: the CLS token after the
final layer norm). Blocks' tokens (variants) come from `output_hidden_states`, each through the
model's final norm; mean pooling skips the CLS and register tokens.

The reference repos' architectures are also known offline (`OFFLINE`): with `--no-pretrained`
they build from transformers' own config and image-processor classes, never touching the hub.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

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
    Preprocessing,
    finish,
    library_versions,
    own_output,
    preprocessing,
    probe_image,
    sized_name,
    weights_id,
)

if TYPE_CHECKING:
    from .registry import BackboneSpec

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


def _source(repo: str, options: LoadOptions) -> str:
    return str(options.weights) if options.weights else repo


def _offline_known(source: str, options: LoadOptions) -> bool:
    """A reference repo built from transformers' own classes (random init): never touches the hub."""
    return not options.pretrained and options.weights is None and source in OFFLINE


def _load_processor(source: str, options: LoadOptions, reference: str | None):
    cache = str(options.cache_dir) if options.cache_dir else None
    if _offline_known(source, options):
        return OFFLINE[source][1]()
    if Path(source).exists() or options.weights is not None:
        check_folder(Path(source), options.pretrained, reference)
    return AutoImageProcessor.from_pretrained(source, cache_dir=cache)


def _load_model(source: str, options: LoadOptions):
    """`from_pretrained` builds on the meta device and fills the weights on the host (one fp32
    copy, no random init underneath); `finish` then places it. transformers' `device_map` would
    fill the target directly but needs `accelerate`, which fgembed does not depend on."""
    cache = str(options.cache_dir) if options.cache_dir else None
    if _offline_known(source, options):
        return AutoModel.from_config(OFFLINE[source][0]())
    if not options.pretrained:
        return AutoModel.from_config(AutoConfig.from_pretrained(source, cache_dir=cache))
    model, info = AutoModel.from_pretrained(source, cache_dir=cache, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        keys = [k if isinstance(k, str) else k[0] for v in bad.values() for k in v]
        raise FgembedError(f"the weights in {source} do not fit its config.json: {len(keys)} "
                           f"{' / '.join(k.split('_')[0] for k in bad)} keys: {', '.join(keys[:3])}"
                           + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""))
    return model


@contextlib.contextmanager
def _load_errors(source: str) -> Iterator[None]:
    """Library errors while reading a repo or folder, as one line."""
    try:
        yield
    except (OSError, ValueError, RuntimeError) as exc:
        raise FgembedError(f"could not load Hugging Face model {source!r}: {str(exc).splitlines()[0]}") from None


def hf_preprocessing(spec: BackboneSpec, name: str, options: LoadOptions) -> Preprocessing:
    """The repo's (or folder's) own image processor: no model needed."""
    repo = spec.model
    source = _source(repo, options)
    with _load_errors(source):
        processor = _load_processor(source, options, repo if options.weights else None)

    transform = ProcessorTransform(processor)
    name = sized_name(name, options.image_size, transform(probe_image()).shape[-1])
    if options.image_size:
        _resize_processor(processor, options.image_size)
    settings = {k: v for k, v in processor.to_dict().items() if not k.startswith("_")}
    fingerprint = {"source": "transformers", "model": repo, "preprocessing": settings}
    return preprocessing(name, transform, fingerprint, _split(processor))


def _final_norm(model) -> torch.nn.Module | None:
    """The norm a ViT applies to its last block's output (DINOv2 `layernorm`, DINOv3 `norm`)."""
    for attr in ("layernorm", "norm"):
        module = getattr(model, attr, None)
        if isinstance(module, torch.nn.LayerNorm):
            return module
    return None


def _tokens(model, norm: torch.nn.Module, n_prefix: int):
    """transformers' `output_hidden_states`: each block's output through the final norm (the last
    one is the model's own `last_hidden_state`), prefix (CLS, registers) and patch tokens apart."""
    def forward(x: torch.Tensor, blocks, own: bool):
        last = model.config.num_hidden_layers - 1
        out = model(pixel_values=x, output_hidden_states=any(b != last for b in blocks))
        normed = {b: out.last_hidden_state if b == last else norm(out.hidden_states[b + 1]) for b in blocks}
        tokens = {b: (t[:, :n_prefix], t[:, n_prefix:]) for b, t in normed.items()}
        return (out.pooler_output if own else None), tokens
    return forward


def load_hf(spec: BackboneSpec, name: str, options: LoadOptions, pooling: str, place: Placement,
            pre: Preprocessing | None = None) -> Backbone:
    repo = spec.model
    pre = pre or hf_preprocessing(spec, name, options)
    source = _source(repo, options)
    with _load_errors(source):
        model = _load_model(source, options)
    if "pixel_values" not in inspect.signature(model.forward).parameters:
        raise FgembedError(f"{source} holds a {model.config.model_type!r} model ({type(model).__name__}), "
                           "which takes no images")
    n_prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    norm = _final_norm(model)
    n_blocks = int(getattr(model.config, "num_hidden_layers", 0) or 0) if norm is not None else 0
    tokens = _tokens(model, norm, n_prefix) if n_blocks else None

    def library_own(x: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=x).pooler_output

    fingerprint = {
        "weights": weights_id(options, repo),
        "pooling": pooling,
        "versions": library_versions("transformers"),
    }
    own = own_output(library_own, tokens, n_blocks, True, pooling, pre.name)
    return finish(pre, model, own, False, fingerprint, place=place, tokens=tokens, n_blocks=n_blocks, has_cls=True)


class ProcessorTransform:
    """One image → the processor's pixel values (`settings` override its own, e.g. no rescale);
    the processor stays reachable, so the device feeds can call it on device tensors."""

    def __init__(self, processor, **settings) -> None:
        self.processor, self.settings = processor, settings

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt", **self.settings)["pixel_values"][0]

    def __repr__(self) -> str:
        """The call, as a caller without fgembed makes it (a model file's metadata names its input so)."""
        settings = "".join(f", {k}={v!r}" for k, v in self.settings.items())
        return f"{type(self.processor).__name__}(images, return_tensors='pt'{settings})['pixel_values']"


def _split(processor) -> tuple | None:
    """The processor's own resize/crop without its rescale and normalise (a uint8 tensor), and its
    mean/std; None where it does not rescale by 1/255 then normalise. `preprocessing` keeps the split only
    if it reproduces the full output (not DINOv3's: its processor resizes in float)."""
    if not (getattr(processor, "do_rescale", False) and getattr(processor, "do_normalize", False)
            and abs(getattr(processor, "rescale_factor", 0) - 1 / 255) < 1e-9):
        return None
    geometric = ProcessorTransform(processor, do_rescale=False, do_normalize=False)
    return geometric, tuple(map(float, processor.image_mean)), tuple(map(float, processor.image_std))
