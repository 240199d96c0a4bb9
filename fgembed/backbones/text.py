"""Class-name embeddings from a backbone's text tower (open_clip members): the zero-shot half of
extraction. Each class is its cleaned name under every prompt template, encoded by the model's
own tokenizer and `encode_text`, normalised, averaged and normalised again (open_clip's
`build_zero_shot_classifier`)."""
from __future__ import annotations

import re

import numpy as np
import torch

from ..errors import FgembedError
from .base import Backbone

# open_clip's own short template set, `open_clip.SIMPLE_IMAGENET_TEMPLATES` (CLIP's "simple"
# prompts), as format strings the store can record verbatim; written out so that importing the
# package does not import open_clip (a test checks they are open_clip's).
PROMPT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.")


def clean_class_name(name: str) -> str:
    """`001.Black_footed_Albatross` → `Black footed Albatross` (CUB's classes.txt); names without
    a numeric prefix or underscores (iNat's) pass through unchanged."""
    return re.sub(r"\s+", " ", re.sub(r"^\d+[.\s_-]+", "", name).replace("_", " ")).strip()


def text_embeddings(backbone: Backbone, class_names: list[str],
                    templates: tuple[str, ...] = PROMPT_TEMPLATES) -> np.ndarray:
    """[C, dim] float32, unit rows: one embedding per class, in `class_names` order."""
    if not backbone.has_text:
        raise FgembedError(f"{backbone.name} has no text tower (zero-shot needs an open_clip model)")
    if not class_names:
        raise FgembedError("no class names to embed")
    with torch.inference_mode():
        emb = backbone.text_encoder([clean_class_name(n) for n in class_names], templates)
    return emb.float().cpu().numpy()
