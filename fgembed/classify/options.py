"""What a user typed → a `RunConfig`, refusing combinations that can only be mistakes.

The configs reset settings that cannot matter (a projection of a concat view, the learning rate
of a kNN head), so that a run's key never splits on them. A person who typed such a setting
expected it to do something: `run_config` and `ensemble_config` take only the options the user
gave (the CLI passes those typed on the command line; a Python caller, its keyword arguments)
and refuse a setting that has no effect with the others in one line, before any work. Options
not given take the config dataclasses' defaults.
"""
from __future__ import annotations

import dataclasses

from ..errors import FgembedError
from .registry import head_class
from .config import HeadConfig, RunConfig, TRAINING
from .fusion import FUSIONS
from .views import ViewConfig

VIEW_OPTIONS = frozenset(f.name for f in dataclasses.fields(ViewConfig)) - {"features"}
HEAD_OPTIONS = frozenset(f.name for f in dataclasses.fields(HeadConfig))
# options that only matter when another is given: option → (the one it needs, why)
NEEDS = {
    "holdout_level": ("holdout", "holds out whole groups of the --holdout fraction"),
    "holdout_seed": ("holdout", "draws the --holdout classes"),
    "draw": ("shots", "picks a draw of the --shots K training rows"),
    "hierarchy": ("levels", "chooses the multi-level head of --levels"),
    "level_weights": ("levels", "weights the losses of the --levels"),
    "temperature": ("teacher", "tempers a teacher's soft targets"),
    "kd_alpha": ("teacher", "weighs a teacher's soft targets"),
    "kd_top_k": ("teacher", "keeps a teacher's most probable classes"),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_needs(given: dict) -> None:
    for name, (needed, what) in NEEDS.items():
        if name in given and not given.get(needed):
            raise FgembedError(f"{flag(name)} {what}; give {flag(needed)} too")


def _check_head(given: dict) -> None:
    head = given.get("head", HeadConfig.head)
    trained = head_class(head).trained  # an unknown head: the registry's one line, with close names
    unused = [flag(name) for name in TRAINING if name in given and not trained]
    if unused:
        raise FgembedError(f"--head {head} is not trained by gradient descent: {', '.join(unused)} "
                           "would have no effect (its own grid is chosen on val)")


def _split(given: dict) -> tuple[dict, dict]:
    unknown = set(given) - VIEW_OPTIONS - HEAD_OPTIONS
    if unknown:
        raise TypeError(f"not a run option: {', '.join(sorted(unknown))}")
    return ({k: v for k, v in given.items() if k in VIEW_OPTIONS},
            {k: v for k, v in given.items() if k in HEAD_OPTIONS})


def run_config(features: tuple[str, ...] | list[str], **given) -> RunConfig:
    """The run `fgembed fit` trains: one feature, or several fused (`fusion`, default concat)."""
    features = tuple(features)
    fused = len(features) > 1
    if "fusion" in given and not fused:
        raise FgembedError(f"--fusion joins several features; {features[0]} is one (join names with +)")
    fusion = given.get("fusion", "concat") if fused else "single"
    if fusion in FUSIONS and "project" not in FUSIONS[fusion].settings:  # an unknown name: ViewConfig says so
        named = [flag(k) for k in ("project", "project_dim") if k in given]
        if named:
            raise FgembedError(f"{', '.join(named)} set the sum fusion's projection; this run is "
                               f"{'--fusion ' + fusion if fused else 'a single feature'}")
    if given.get("l2") and not fused:
        raise FgembedError("--l2 normalises each member of a fusion; a single feature has no members to balance")
    _check_needs(given)
    _check_head(given)
    view, head = _split({k: v for k, v in given.items() if k != "fusion"})
    return RunConfig(ViewConfig(features=features, fusion=fusion, **view), HeadConfig(**head))


def ensemble_config(members: list[str], strategies: list[str], **given) -> RunConfig:
    """The base of every run `fgembed ensemble` trains: the head settings, and the view settings
    its `concat` / `sum` runs share (a `sum` base view carries them; its members are replaced per
    combination). A fusion setting with no fusion strategy to use it is refused."""
    if "fusion" in given:
        raise TypeError("ensemble fuses by --strategies, not fusion")
    reads = {name for s in strategies if s in FUSIONS for name in FUSIONS[s].settings}  # late reads none
    if "project" not in reads:
        named = [flag(k) for k in ("project", "project_dim") if k in given]
        if named:
            raise FgembedError(f"{', '.join(named)} set the sum fusion's projection; --strategies has no sum")
    if given.get("l2") and "l2" not in reads:
        raise FgembedError("--l2 normalises the members of an embedding fusion; --strategies has none "
                           "(late fusion averages logits)")
    _check_needs(given)
    _check_head(given)
    view, head = _split(given)
    fused = len(members) > 1
    return RunConfig(ViewConfig(features=tuple(members), fusion="sum" if fused else "single",
                                **(view if fused else {k: v for k, v in view.items() if k != "l2"})),
                     HeadConfig(**head))
