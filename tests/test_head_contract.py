"""Every registered head keeps the scikit-learn estimator contract: a head is tested by being
registered. scikit-learn's own estimator checks where they apply (a head that needs class-name
text embeddings cannot take the checks' random data and labels), and for every head `clone` and
`cross_val_score`."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import cross_val_score
from sklearn.utils.estimator_checks import check_estimator

from fgembed.classify.base import Head
from fgembed.classify.registry import head_class, list_heads


def instance(name: str, **extra) -> Head:
    """A registered head on the CPU; a trained one at a short, brisk recipe (the checks fit dozens of
    times; 20 epochs at lr 1e-2 learn their toy problems as 150 at 1e-3 do)."""
    cls = head_class(name)
    return cls(device="cpu", **({"epochs": 20, "lr": 1e-2} if cls.trained else {}), **extra)


def _data(n_classes: int = 4, per_class: int = 30, dim: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 3
    y = np.repeat(np.arange(n_classes), per_class)
    return (centres[y] + rng.normal(size=(len(y), dim))).astype(np.float32), y, centres


@pytest.mark.parametrize("name", [h for h in list_heads() if not head_class(h).needs_text])
def test_scikit_learn_estimator_checks(name):
    failed = [f"{r['check_name']}: {r['exception']}" for r in check_estimator(instance(name), on_fail=None)
              if r["status"] == "failed"]
    assert not failed, failed


@pytest.mark.parametrize("name", list_heads())
def test_clone_and_cross_val_score(name):
    X, y, centres = _data()
    labels = np.array(["finch", "gull", "tern", "wren"])[y]  # any labels, mapped back by classes_
    extra = {"text_embeddings": centres, "logit_scale": 10.0} if head_class(name).needs_text else {}
    head = instance(name, **extra)
    copy = clone(head)
    for key, value in head.get_params().items():
        np.testing.assert_array_equal(np.asarray(copy.get_params()[key], dtype=object), np.asarray(value, dtype=object))
    scores = cross_val_score(head, X, labels, cv=3)
    assert scores.min() > 0.5  # four well-separated classes: far above chance (0.25)
    fitted = clone(head).fit(X, labels)
    assert set(fitted.predict(X)) <= set(labels) and fitted.predict_proba(X).shape == (len(X), 4)


@pytest.mark.parametrize("name", list_heads())
def test_capabilities_are_declared(name):
    cls = head_class(name)
    assert issubclass(cls, Head)
    assert isinstance(cls.trained, bool) and isinstance(cls.needs_text, bool)
    assert set(cls.architecture) <= {"hidden", "dropout"}  # what HeadConfig can give it
