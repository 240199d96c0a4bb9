"""Extraction variants: several feature groups from one forward of a backbone.

A group is named `<backbone>[~<size>][~<layers>][~<pooling>][~flip]`, in that order
(CONVENTIONS.md): `dinov2_vitl14~448~linear4~flip`. `@` stays the head separator. Each suffix
names something that changes the numbers, and each is also a strict fingerprint key:

- `~<size>`: another input size (the model is built for it: a model of its own).
- `~l<i>`: the output of block `i` (counted from 0) after the model's final norm, pooled (CLS by
  default); `~linear4`: the input of DINOv2's linear evaluation, [CLS of the last four blocks,
  each after the final norm, then the mean of the last block's patch tokens], 5 × width.
- `~cls`, `~mean`, `~cls+mean`: a pooling of the tokens other than the model's own output
  (`pooled`: timm's `forward_head(pre_logits=True)`, transformers' `pooler_output`, open_clip's
  `encode_image`). Mean pooling skips the CLS and register tokens.
- `~flip`: the mean of the embeddings of the image and of its mirror (the model input flipped
  left to right), from one forward of the doubled batch.

Everything but the size is read from one forward, so `extract` runs each model once per batch
however many of its variants are asked for (`readout`). The token outputs come from each
library's own API (timm `forward_intermediates`, transformers `output_hidden_states`, open_clip's
`forward_intermediates`); each adapter exposes them as `Backbone.tokens`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import FgembedError

POOLINGS = ("pooled", "cls", "mean", "cls+mean")
TOKEN_POOLINGS = POOLINGS[1:]
PRESETS = {"linear4": 4}  # preset → how many of the last blocks it reads
FINAL = "final"  # --layers item: the model's own output (no layers suffix)
_BLOCK = re.compile(r"l(\d+)")

# (prefix tokens [B, P, D] or None, patch tokens [B, N, D]) of one block, after the final norm
Tokens = tuple[torch.Tensor | None, torch.Tensor]
# x, blocks → (the model's own output or None when not asked, {block: tokens})
TokenForward = Callable[[torch.Tensor, Sequence[int], bool], tuple[torch.Tensor | None, dict[int, Tokens]]]


@dataclass(frozen=True)
class Variant:
    """What one feature group reads from a backbone's forward (the suffixes after its size)."""

    layers: str | None = None  # None: the final output; "linear4"; "l<i>": block i
    pooling: str | None = None  # None: the default (the model's own output; CLS of a block)
    flip: bool = False

    @property
    def suffix(self) -> str:
        return "".join(f"~{part}" for part in (self.layers, self.pooling, "flip" if self.flip else None) if part)

    @property
    def plain(self) -> bool:
        return self == Variant()

    def blocks(self, n_blocks: int) -> list[int]:
        """Blocks whose tokens this variant reads (none for the model's own output)."""
        if self.layers in PRESETS:
            return list(range(n_blocks - PRESETS[self.layers], n_blocks))
        if self.layers:
            return [int(self.layers[1:])]
        return [n_blocks - 1] if self.pooling else []


def _kind(token: str) -> int:
    """Position of a suffix in the fixed order: 0 size, 1 layers, 2 pooling, 3 flip; -1 unknown."""
    if token.isdigit():
        return 0
    if token in PRESETS or _BLOCK.fullmatch(token):
        return 1
    if token in POOLINGS:
        return 2
    return 3 if token == "flip" else -1


def split_name(name: str) -> tuple[str, int | None, Variant]:
    """`dinov2_vitl14~448~linear4~flip` → (`dinov2_vitl14`, 448, Variant("linear4", None, True)).

    Suffixes are peeled from the right; a `~` followed by a path (`hf:~/models/x`) belongs to the
    name. The order is fixed, so each variant has one name."""
    parts: dict[int, str] = {}
    base = name
    while "~" in base:
        head, _, token = base.rpartition("~")
        if not token or "/" in token or not head:
            break
        kind = _kind(token)
        if kind < 0:
            raise FgembedError(f"{name!r}: unknown variant ~{token}; after '~' comes an image size in pixels (~448), "
                               f"layers (~linear4, ~l20), a pooling ({', '.join('~' + p for p in TOKEN_POOLINGS)}) "
                               "or ~flip")
        if kind in parts or any(k < kind for k in parts):
            raise FgembedError(f"{name!r}: variants go in the order ~size~layers~pooling~flip, each once "
                               "(e.g. dinov2_vitl14~448~linear4~flip)")
        parts[kind] = token
        base = head
    size = parts.get(0)
    if size is not None and int(size) < 1:
        raise FgembedError(f"{name!r}: after '~' comes an image size in pixels, e.g. {base}~448")
    variant = Variant(parts.get(1), parts.get(2), 3 in parts)
    if variant.pooling == "pooled":
        raise FgembedError(f"{name!r}: ~pooled is the default output; drop it")
    if variant.layers in PRESETS and variant.pooling:
        raise FgembedError(f"{name!r}: ~{variant.layers} has its own pooling; drop ~{variant.pooling}")
    if variant.layers and variant.pooling == "cls":
        raise FgembedError(f"{name!r}: a block is pooled by its CLS token by default; drop ~cls")
    return base, int(size) if size else None, variant


def _layer_items(layers: Sequence[str]) -> list[str | None]:
    items: list[str | None] = []
    for item in layers:
        item = item.strip()
        if item == FINAL:
            items.append(None)
        elif item in PRESETS:
            items.append(item)
        elif item.lstrip("-").isdigit():
            if int(item) < 0:
                raise FgembedError(f"--layers {item}: blocks count from 0 (the first block)")
            items.append(f"l{int(item)}")
        else:
            raise FgembedError(f"--layers takes block indices (from 0), {', '.join(PRESETS)} or {FINAL}; got {item!r}")
    return list(dict.fromkeys(items))


def expand_names(names: Sequence[str], layers: Sequence[str] = (), poolings: Sequence[str] = (),
                 tta: Sequence[str] = ()) -> list[str]:
    """The group names that `--backbone NAME --layers … --pooling … --tta …` ask for: every
    combination, in a stable order. A flag that a name already fixes with its own suffix, or
    that changes none of the groups, is refused (it can only be a mistake)."""
    layer_items = _layer_items(layers) if layers else [None]
    for p in poolings:
        if p not in POOLINGS:
            raise FgembedError(f"unknown pooling {p!r}; choose from {', '.join(POOLINGS)}")
    for t in tta:
        if t not in ("none", "flip"):
            raise FgembedError(f"unknown --tta {t!r}; choose none or flip")
    pooling_items = list(dict.fromkeys(poolings)) or ["pooled"]
    flips = list(dict.fromkeys(t == "flip" for t in tta)) or [False]
    if poolings and all(item in PRESETS for item in layer_items):
        raise FgembedError(f"--pooling has no effect on --layers {','.join(layers)} (a preset pools its own way)")
    out: list[str] = []
    for name in names:
        base, size, own = split_name(name)
        for flag, given, mine in (("--layers", layers, own.layers), ("--pooling", poolings, own.pooling),
                                  ("--tta", tta, own.flip)):
            if given and mine:
                raise FgembedError(f"{name!r} names its own {flag[2:]}; drop {flag} or the suffix")
        stem = base + (f"~{size}" if size else "")
        for layer in layer_items if not own.layers else [own.layers]:
            pools = [own.pooling] if own.pooling else [None] if layer in PRESETS else pooling_items
            for pooling in pools:
                if pooling == "pooled" or (layer and pooling == "cls"):
                    pooling = None  # the default of a final output / of a block
                for flip in flips if not own.flip else [True]:
                    out.append(stem + Variant(layer, pooling, flip).suffix)
    return list(dict.fromkeys(out))


def pool(tokens: Tokens, pooling: str) -> torch.Tensor:
    """CLS, the mean of the patch tokens (prefix and register tokens excluded), or both."""
    prefix, patches = tokens
    parts = {"cls": lambda: prefix[:, 0], "mean": lambda: patches.mean(dim=1)}
    return torch.cat([parts[p]() for p in pooling.split("+")], dim=1) if "+" in pooling else parts[pooling]()


def variant_fingerprint(fingerprint: dict, variant: Variant, n_blocks: int) -> dict:
    """The strict fingerprint of a variant: the model's own for the plain output (so stores made
    before variants existed still match), else its pooling, blocks and view recorded."""
    fp = dict(fingerprint)
    if variant.layers:
        fp["layers"] = variant.blocks(n_blocks)
        fp["pooling"] = variant.layers if variant.layers in PRESETS else variant.pooling or "cls"
    elif variant.pooling:
        fp["pooling"] = variant.pooling
    if variant.flip:
        fp["tta"] = "flip: mean of the embeddings of the model input and its left-right mirror"
    return fp


def readout(variants: Sequence[Variant], own: Callable[[torch.Tensor], torch.Tensor], tokens: TokenForward | None,
            n_blocks: int, has_cls: bool, name: str) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """One function computing every variant's embedding of a batch from one forward: the model's
    own output (`own`) when only that is asked, else `tokens` with the blocks the variants read.
    With any `~flip`, the batch and its mirror go through together and flip variants average the
    two halves (in fp32); the others read the first half."""
    if tokens is None and any(v.layers or v.pooling for v in variants):
        raise FgembedError(f"{name} gives no token outputs (layers and token poolings need a ViT of timm, "
                           "open_clip or transformers)")
    for v in variants:
        if v.layers in PRESETS and n_blocks < PRESETS[v.layers]:
            raise FgembedError(f"{name} has {n_blocks} blocks (0–{n_blocks - 1}); ~{v.layers} reads the last "
                               f"{PRESETS[v.layers]}")
        if v.layers and v.layers not in PRESETS and int(v.layers[1:]) >= n_blocks:
            raise FgembedError(f"{name} has {n_blocks} blocks (0–{n_blocks - 1}); ~{v.layers} is not one of them")
    blocks = sorted({b for v in variants for b in v.blocks(n_blocks)})
    for v in variants:  # refused before any forward, not on the first batch
        if (v.layers in PRESETS or "cls" in (v.pooling or ("cls" if v.layers else ""))) and not has_cls:
            raise FgembedError(f"{name}{v.suffix}: {name} has no CLS token; pool it with ~mean")
    needs_own = any(not v.layers and not v.pooling for v in variants)
    flip = any(v.flip for v in variants)

    def one(v: Variant, out: torch.Tensor | None, toks: dict[int, Tokens]) -> torch.Tensor:
        if v.layers in PRESETS:
            last = toks[n_blocks - 1]
            cls = [toks[b][0][:, 0] for b in v.blocks(n_blocks)]
            return torch.cat([*cls, last[1].mean(dim=1)], dim=1)
        if v.layers:
            return pool(toks[int(v.layers[1:])], v.pooling or "cls")
        if v.pooling:
            return pool(toks[n_blocks - 1], v.pooling)
        return out

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        n = x.shape[0]
        if flip:
            x = torch.cat([x, x.flip(-1)])
        if blocks:
            out, toks = tokens(x, blocks, needs_own)
        else:
            out, toks = own(x), {}
        results = []
        for v in variants:
            e = one(v, out, toks)
            results.append((e[:n].float() + e[n:].float()) / 2 if v.flip else e[:n])
        return results

    return run
