"""Many heads in one pass: a head trained in a seeds × lr × weight-decay grid equals the same head
trained alone; the batched model equals torch's own modules; the grid picks the best val F1."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from torch import nn

from fgembed.classify.heads import LinearHead, MLPHead
from fgembed.classify.registry import HEADS, create_head, list_heads
from fgembed.classify.train import train_grid, weighted_f1
from fgembed.errors import FgembedError

D, C = 12, 4


def _data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=1.5, size=(C, D))
    y = np.arange(n) % C
    return (centres[y] + rng.normal(size=(n, D))).astype(np.float32), y


def _split():
    X, y = _data(160)
    return X[:110], y[:110], X[110:], y[110:]


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name].float(), b[name].float(), rtol=1e-5, atol=1e-5, msg=name)


HEAD_KINDS = [
    lambda **kw: MLPHead(hidden=(16, 8), epochs=3, batch_size=16, device="cpu", **kw),
    lambda **kw: LinearHead(epochs=3, batch_size=16, device="cpu", **kw),
    lambda **kw: MLPHead(hidden=(8,), epochs=3, batch_size=16, device="cpu", sum_blocks=(5, 7), sum_dim=6, **kw),
]


@pytest.mark.parametrize("make", HEAD_KINDS, ids=["mlp", "linear", "mlp+learned-sum"])
def test_seeds_in_one_pass_equal_seeds_alone(make):
    X, y, Xv, yv = _split()
    together = make().fit_grid(X, y, Xv, yv, seeds=[0, 1, 2], n_classes=C)
    for seed, head in zip([0, 1, 2], together):
        alone = make(random_state=seed).fit_grid(X, y, Xv, yv, seeds=[seed], n_classes=C)[0]
        _assert_same_state(head.module_.state_dict(), alone.module_.state_dict())
        np.testing.assert_allclose(head.predict_logits(Xv), alone.predict_logits(Xv), rtol=1e-5, atol=1e-5)
        assert head.best_epoch_ == alone.best_epoch_ and head.random_state == seed
    assert not np.allclose(together[0].predict_logits(Xv), together[1].predict_logits(Xv))  # seeds differ


def test_every_setting_of_an_lr_wd_grid_equals_that_head_alone():
    X, y, Xv, yv = _split()
    lrs, wds, seeds = [1e-3, 1e-2], [0.0, 0.1], [0, 5]
    make = lambda lr=1e-3, wd=0.01, seed=0: MLPHead(hidden=(16,), epochs=3, batch_size=16, lr=lr,  # noqa: E731
                                                    weight_decay=wd, random_state=seed, device="cpu")
    t = lambda a, dt=torch.float32: torch.as_tensor(a, dtype=dt)  # noqa: E731
    grid = train_grid(lambda: make()._network(D, C), t(X), t(y, torch.long), t(Xv), t(yv, torch.long), C, seeds,
                      lrs, wds, epochs=3, batch_size=16)
    assert [(r.lr, r.weight_decay) for r in grid[0]] == [(lr, wd) for lr in lrs for wd in wds]
    for s, seed in enumerate(seeds):
        for r in grid[s]:
            alone = make(r.lr, r.weight_decay, seed).fit_grid(X, y, Xv, yv, seeds=[seed], n_classes=C)[0]
            _assert_same_state(r.state_dict, alone.module_.state_dict())
            assert (r.seed, r.best_epoch) == (seed, alone.best_epoch_)


def test_batched_model_equals_torch_modules_trained_by_hand():
    """The reference: torch's own Linear/BatchNorm/AdamW in a plain loop, same init and batch
    order (dropout 0, so the generator draws only the permutation)."""
    X, y, Xv, yv = _split()
    head = MLPHead(hidden=(16, 8), dropout=0.0, epochs=3, batch_size=16, lr=1e-2, weight_decay=0.05,
                   random_state=7, device="cpu").fit_grid(X, y, Xv, yv, seeds=[7], n_classes=C)[0]
    torch.manual_seed(7)
    model = head._network(D, C)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    generator = torch.Generator().manual_seed(7)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    states = []
    for _ in range(3):
        model.train()
        order = torch.randperm(len(X), generator=generator)
        for start in range(0, len(X), 16):
            idx = order[start:start + 16]
            if len(idx) < 2:
                continue
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(Xt[idx]), yt[idx]).backward()
            optimizer.step()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    _assert_same_state(head.module_.state_dict(), states[head.best_epoch_])
    model.load_state_dict(states[head.best_epoch_])
    model.eval()
    with torch.no_grad():
        pred = model(torch.as_tensor(Xv)).argmax(1).numpy()
    assert head.best_val_f1_ == pytest.approx(f1_score(yv, pred, average="weighted"))


def test_grid_keeps_per_seed_the_setting_with_the_best_val_f1():
    X, y, Xv, yv = _split()
    heads = MLPHead(hidden=(16,), epochs=4, batch_size=16, device="cpu").fit_grid(
        X, y, Xv, yv, seeds=[0, 1], lrs=[1e-4, 3e-2], weight_decays=[0.0, 0.5], n_classes=C)
    assert len(heads) == 2 and [h.random_state for h in heads] == [0, 1]
    for head in heads:
        assert len(head.grid_) == 4
        best = max(head.grid_, key=lambda g: g["best_val_f1"])
        assert head.chosen_ == {"lr": best["lr"], "weight_decay": best["weight_decay"]}
        assert head.best_val_f1_ == best["best_val_f1"] == max(h["val_f1"] for h in head.history_)
        # the kept state is the one that scored it (independent F1 from scikit-learn)
        assert f1_score(yv, head.predict(Xv), average="weighted") == pytest.approx(head.best_val_f1_)
    assert len({(g["lr"], g["weight_decay"]) for g in heads[0].grid_}) == 4


def test_float16_rows_train_and_predict_like_float32():
    X, y, Xv, yv = _split()
    X16, Xv16 = X.astype(np.float16), Xv.astype(np.float16)
    make = lambda: MLPHead(hidden=(16,), epochs=3, batch_size=16, device="cpu")  # noqa: E731
    a = make().fit_grid(X16, y, Xv16, yv, seeds=[0], n_classes=C)[0]
    b = make().fit_grid(X16.astype(np.float32), y, Xv16.astype(np.float32), yv, seeds=[0], n_classes=C)[0]
    _assert_same_state(a.module_.state_dict(), b.module_.state_dict())
    np.testing.assert_allclose(a.predict_logits(Xv16), b.predict_logits(Xv), rtol=1e-2, atol=1e-2)
    assert (a.predict(torch.as_tensor(Xv16)) == b.predict(Xv)).mean() >= 0.95  # float16 ties may flip a row


def test_weighted_f1_matches_scikit_learn_per_head():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 200)
    pred = np.where(rng.random((3, 200)) < 0.6, y, rng.integers(0, 9, (3, 200)))  # classes 7, 8 only predicted
    got = weighted_f1(torch.as_tensor(y), torch.as_tensor(pred), 9).numpy()
    want = [f1_score(y, p, average="weighted", zero_division=0) for p in pred]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_registry_lists_creates_and_refuses_with_close_names():
    assert {"mlp", "linear"} <= set(list_heads()) and list_heads("lin*") == ["linear"]
    assert HEADS["mlp"] is MLPHead
    head = create_head("mlp", hidden=(8,), device="cpu")
    assert isinstance(head, MLPHead) and head.hidden == (8,)
    with pytest.raises(FgembedError, match="unknown head 'mpl'; did you mean mlp"):
        create_head("mpl")


def test_from_state_rebuilds_a_saved_head():
    X, y, Xv, yv = _split()
    head = MLPHead(hidden=(16,), epochs=2, batch_size=16, device="cpu").fit_grid(X, y, Xv, yv, seeds=[0], n_classes=C)[0]
    state = {k: v.detach().cpu().clone() for k, v in head.module_.state_dict().items()}
    again = MLPHead.from_state(head.get_params(), D, C, state)
    np.testing.assert_array_equal(again.predict_logits(Xv), head.predict_logits(Xv))
    with pytest.raises(ValueError, match="expecting 12 features"):  # scikit-learn's own check
        again.predict_logits(Xv[:, :5])


def test_bad_grids_are_refused():
    X, y, Xv, yv = _split()
    head = MLPHead(epochs=1, device="cpu")
    with pytest.raises(FgembedError, match="learning rates must be > 0"):
        head.fit_grid(X, y, Xv, yv, seeds=[0], lrs=[1e-3, 0.0])
    with pytest.raises(FgembedError, match="weight decays must be ≥ 0"):
        head.fit_grid(X, y, Xv, yv, seeds=[0], weight_decays=[-1.0])
    with pytest.raises(FgembedError, match="seeds must be distinct"):
        head.fit_grid(X, y, Xv, yv, seeds=[1, 1])
    with pytest.raises(FgembedError, match="one label per row"):
        head.fit_grid(X, y[:-1], Xv, yv, seeds=[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph step needs a GPU")
def test_cuda_graph_step_matches_the_eager_step():
    X, y, Xv, yv = (torch.as_tensor(a, device="cuda") for a in _split())
    make = lambda: MLPHead(hidden=(16, 8))._network(D, C)  # noqa: E731
    runs = [train_grid(make, X.half(), y, Xv.half(), yv, C, [0, 1], [1e-3, 1e-2], [0.01], epochs=3, batch_size=16,
                       cuda_graphs=graphs) for graphs in (True, False)]
    for graphed, eager in zip(*([r for per_seed in run for r in per_seed] for run in runs)):
        _assert_same_state(graphed.state_dict, eager.state_dict)
