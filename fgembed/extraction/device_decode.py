"""The device side of the feed: JPEGs decoded in batches by nvJPEG, each library's resize/crop
replayed on the decoded tensors.

Why: resizing a 500×375 photo five ways costs the decode workers ~20 ms of CPU per image, so a
job with few or small backbones, or eight GPUs sharing one host, is bound by the host's cores.
With `--decode device` the workers only read bytes (and parse a JPEG header), torchvision's
`decode_jpeg(device="cuda")` decodes a whole batch at once, and the library's own steps run on
the GPU. With `--device-resize` the workers still decode (PIL) but resize nothing.

Replayed, per library:
- timm and open_clip eval transforms (a torchvision `Compose`): their own `Resize` and
  `CenterCrop` modules, on uint8 tensors (antialiased, as on PIL images; the numbers move by a
  level here and there, since the tensor kernels are not PIL's: cosine ≥ 0.999 on the test
  models). Normalisation stays `DeviceModel`'s.
- transformers image processors (their torchvision backend): the processor itself, called on
  the device tensors — the library's very code, on another device.
Anything else cannot be replayed honestly and is refused for the device feeds.

A JPEG that nvJPEG rejects is decoded on the CPU (PIL, the image policy), and flagged as the
CPU path would flag it; the worker already sent everything but clean JPEGs decoded.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

from ..images import OK, UNREADABLE, decode_rgb
from .feeds import decoded_tensor

# Steps of a torchvision Compose that mean nothing to an RGB uint8 tensor (the image is RGB
# already; /255 and Normalize happen on the device from the backbone's mean/std).
_SKIPS = (T.ToTensor, T.PILToTensor, T.Normalize)
_PLACEHOLDER = (3, 8, 8)  # a failed row's stand-in: its embedding is NaN-ed by its status

Replay = Callable[[list[torch.Tensor]], torch.Tensor]


def _grouped(steps: Callable[[torch.Tensor], torch.Tensor], images: list[torch.Tensor]) -> torch.Tensor:
    """Apply `steps` to each run of same-sized images as one batch, then restore the order."""
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(images)
    for rows in by_shape.values():
        for i, result in zip(rows, steps(torch.stack([images[i] for i in rows]))):
            out[i] = result
    return torch.stack(out)


def replay_steps(transform, mean: tuple[float, ...]) -> Replay | None:
    """The library's own resize/crop for device tensors: (uint8 CHW images) → a batch — uint8 for a
    torchvision Compose (normalised later with `mean`/std), float and normalised for a
    transformers processor. None when the transform holds any other step."""
    processor = getattr(transform, "processor", None)
    if processor is not None and hasattr(processor, "process_image"):  # transformers' torchvision backend
        def process(images: list[torch.Tensor]) -> torch.Tensor:
            return processor(images=images, return_tensors="pt", device=images[0].device,
                             input_data_format="channels_first")["pixel_values"]
        return process
    if not isinstance(transform, T.Compose) or not mean:
        return None
    steps = []
    for step in transform.transforms:
        if isinstance(step, (T.Resize, T.CenterCrop)):
            steps.append(step)
        elif not (isinstance(step, _SKIPS) or type(step).__name__ in ("MaybeToTensor", "MaybePILToTensor",
                                                                      "MaybeConvertMode")  # timm's, open_clip's
                  or getattr(step, "__name__", "") == "_convert_to_rgb"):
            return None
    compose = T.Compose(steps)
    return lambda images: _grouped(compose, images)


class DeviceDecoder:
    """A batch from `EncodedImages` → uint8 CHW images on the device, statuses updated."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, status: np.ndarray, items: list[torch.Tensor]) -> list[torch.Tensor]:
        """`status` is updated in place for JPEGs that only the CPU could (or could not) decode."""
        out: list[torch.Tensor | None] = [None] * len(items)
        jpegs = [i for i, item in enumerate(items) if item.dim() == 1 and item.numel()]
        for i, image in zip(jpegs, self._decode([items[i] for i in jpegs])):
            if image is None:  # nvJPEG refused it: the CPU decides, as the CPU path would
                decoded, status[i] = decode_rgb(items[i].numpy().tobytes())
                image = decoded_tensor(decoded).to(self.device) if decoded is not None else None
            out[i] = image
        for i, item in enumerate(items):
            if item.dim() == 3:
                out[i] = item.to(self.device, non_blocking=True)
            if out[i] is None:
                out[i] = torch.zeros(_PLACEHOLDER, dtype=torch.uint8, device=self.device)
                if status[i] == OK:  # a JPEG neither decoder could read is flagged, never embedded
                    status[i] = UNREADABLE
        return out

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Batched decode; if the batch fails, each image alone, a failure being None."""
        if not data:
            return []
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass
        out = []
        for one in data:
            try:
                out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                out.append(None)
        return out
