"""An extraction fingerprint's two parts and their differences, as readable lines.

The strict part is what changes the numbers (source, weights, preprocessing, pooling, precision…):
a mismatch refuses a resume or a prediction. The recorded part (library versions, device, host…)
only warns. Feature groups (`feature_groups.py`) store both; prediction compares a run's record
with its store's through `fingerprint_changes`.
"""
from __future__ import annotations

import json

FINGERPRINT_SCHEMA = 2
# The fingerprint's strict part refuses a mismatch; these keys are the recorded part (warn only).
RECORDED_KEYS = ("versions", "device", "cuda", "host", "root", "hub_revision")


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two fingerprints, nested keys joined by dots."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)} → {json.dumps(b)}")
    return out


def split_fingerprint(fingerprint: dict) -> tuple[dict, dict]:
    """(strict, recorded) parts of a fingerprint (a schema-1 store kept both in one dict)."""
    return ({k: v for k, v in fingerprint.items() if k not in RECORDED_KEYS},
            {k: v for k, v in fingerprint.items() if k in RECORDED_KEYS})


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """Differences in the strict parts of two fingerprints (what changes the numbers), readable."""
    return differences(split_fingerprint(old)[0], split_fingerprint(new)[0])
