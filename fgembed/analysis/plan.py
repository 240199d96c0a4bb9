"""What `fgembed ensemble` scores: rows of the table as (strategy, members) combinations.

Combinations are written as tokens: `all` (every subset of two or more members), `pairs`,
`full` (all members together), `singles` (no fusion rows), or an explicit `a+b+c`; a
`strategy:` prefix limits a token to one strategy (`late:full`). A strategy is any registered
embedding fusion of several members (`concat`, `sum`, …: a run trained on the fused view),
`late` (the single runs' logits averaged) or `gated` (the single runs' logits weighted per image by
a gate trained on validation rows, `classify/gated.py`). Single-backbone rows are always included: they are the
baseline every fusion is read against, and late fusion needs them anyway. A member may name its
head (`dinov2_vitl14@knn`).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from ..classify.fusion import fusion_strategies
from ..classify.config import RunConfig
from ..errors import FgembedError


@dataclass(frozen=True)
class Combination:
    strategy: str               # single, late (late-val: val-weighted beside it), gated, or a registered fusion
    members: tuple[str, ...]

    @property
    def name(self) -> str:
        return " + ".join(self.members)


def plan(members: list[str], strategies: list[str], combinations: list[str]) -> list[Combination]:
    """The rows to score, singles first, each combination once, in a stable order."""
    if len(set(members)) != len(members):
        raise FgembedError(f"a member is named twice in {','.join(members)}")
    for strategy in strategies:
        if strategy not in fusion_strategies():
            raise FgembedError(f"unknown strategy {strategy!r}; choose from {', '.join(fusion_strategies())}")
    rows = [Combination("single", (m,)) for m in members]
    for token in combinations:
        prefix, sep, rest = token.partition(":")  # member names may hold ':' too (timm:test_vit)
        chosen, selector = ([prefix], rest) if sep and prefix in fusion_strategies() else (strategies, token)
        for subset in _subsets(members, selector):
            rows += [Combination(s, subset) for s in chosen]
    return list(dict.fromkeys(rows))


def _subsets(members: list[str], selector: str) -> list[tuple[str, ...]]:
    if selector == "all":
        return [c for k in range(2, len(members) + 1) for c in itertools.combinations(members, k)]
    if selector == "pairs":
        return list(itertools.combinations(members, 2))
    if selector == "full":
        return [tuple(members)] if len(members) > 1 else []
    if selector == "singles":  # the single rows only (they are always in the plan)
        return []
    subset = tuple(selector.split("+"))
    unknown = [m for m in subset if m not in members]
    if unknown or len(subset) < 2:
        raise FgembedError(f"combination {selector!r} must be all, pairs, full, singles or two or more members "
                           f"joined by + ({', '.join(members)})")
    return [subset]


def split_member(member: str) -> tuple[str, str | None]:
    """`backbone@head` → (backbone, head); a plain backbone name → (name, None): the base head."""
    name, sep, head = member.rpartition("@")
    return (name, head) if sep and name and head else (member, None)


def run_config(base: RunConfig, strategy: str, members: tuple[str, ...]) -> RunConfig:
    """`base` with these members fused this way (its view's l2 / projection / row selection kept).
    A single member may name its own head (`dinov2_vitl14@knn`, `openclip_vitl14@zeroshot`)."""
    fusion = "single" if strategy in ("single", "late") else strategy
    names, heads = zip(*(split_member(m) for m in members))
    config = base
    if any(heads):
        if len(members) > 1:
            raise FgembedError(f"{strategy} fusion trains one head on all its members: member@head goes with "
                               f"late fusion only (--strategies late), got {' + '.join(members)}")
        # a named head predicts one level: with --levels, the finest (late fusion then scores that level)
        one_level = {"levels": (), "level": base.head.levels[-1]} if base.head.levels else {}
        config = dataclasses.replace(base, head=dataclasses.replace(base.head, head=heads[0], **one_level))
    view = dataclasses.replace(base.view, features=names, fusion=fusion if len(members) > 1 else "single")
    return dataclasses.replace(config, view=view)


