"""Taxonomy, multi-level heads (incl. the flamingo-or-bird paper's stop-gradient), training, decoders and hierarchy metrics,
checked on generated hierarchical features and against scikit-learn / brute force."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from fgembed.classify.hierarchy import (
    HIERARCHIES,
    DisentangledHeads,
    SharedTrunkHeads,
    create_hierarchy,
    fit_levels,
    fit_levels_grid,
    hierarchical_loss,
    list_hierarchies,
    predict_levels,
)
from fgembed.classify.hierarchy_metrics import (
    SELECTIVE_TAUS,
    Taxonomy,
    consistency_rate,
    consistent_rows,
    curve_of_points,
    decode_path_product,
    decode_top_down,
    decoded_metrics,
    deepest_confident,
    lca_depth,
    level_metrics,
    mistake_severity,
    plot_selective_curve,
    selective_curve,
    selective_points,
)
from fgembed.errors import FgembedError

ORDERS, FAMILIES_PER_ORDER, SPECIES_PER_FAMILY = 3, 2, 3
NOISE = 2.5  # hard enough that species accuracy is well below 1 (logistic regression: 0.83)


def make_features(n_per_class: int = 20, d: int = 24, noise: float = 0.6, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Rows around fixed nested centres: order (far apart) + family offset + species offset, plus
    noise drawn from `seed` (so another seed is a fresh sample of the same classes).
    Returns X float32 and {"order", "family", "species"} codes per row (species = fine)."""
    centres = np.random.default_rng(1234)
    n_fam, n_sp = ORDERS * FAMILIES_PER_ORDER, ORDERS * FAMILIES_PER_ORDER * SPECIES_PER_FAMILY
    order_c, fam_c, sp_c = (centres.normal(0, s, (n, d)) for s, n in ((4.0, ORDERS), (2.0, n_fam), (1.2, n_sp)))
    rng = np.random.default_rng(seed)
    species = np.repeat(np.arange(n_sp), n_per_class)
    family = species // SPECIES_PER_FAMILY
    order = family // FAMILIES_PER_ORDER
    X = order_c[order] + fam_c[family] + sp_c[species] + rng.normal(0, noise, (len(species), d))
    return X.astype(np.float32), {"order": order, "family": family, "species": species}


def taxonomy() -> Taxonomy:
    _, codes = make_features(n_per_class=1)
    return Taxonomy.from_codes(codes, ["order", "family", "species"])


def test_taxonomy_ancestors_parents_and_alias():
    _, codes = make_features(n_per_class=2)
    tax = Taxonomy.from_codes({"order": codes["order"], "family": codes["family"], "label": codes["species"]},
                              ["order", "family", "species"])  # species is the fine `label`
    assert tax.order == ("order", "family", "species") and tax.fine == "species"
    fine = np.array([0, 5, 17])
    assert tax.ancestors(fine, "family").tolist() == [0, 1, 5]
    assert tax.ancestors(fine, "order").tolist() == [0, 0, 2]
    assert tax.ancestors(fine, "label").tolist() == fine.tolist()
    assert tax.parents(1).tolist() == [0, 0, 1, 1, 2, 2]
    assert tax.paths().shape == (18, 3)


def test_taxonomy_refuses_levels_that_do_not_nest():
    _, codes = make_features(n_per_class=2)
    bad = codes["family"].copy()
    bad[0] = 1  # one row of species 0 (family 0) now in family 1 (same order)
    with pytest.raises(FgembedError, match="do not nest: species class 0 falls under family classes 0 and 1"):
        Taxonomy.from_codes({**codes, "family": bad}, ["order", "family", "species"])
    with pytest.raises(FgembedError, match="do not nest"):  # fine to coarse is the wrong way round
        Taxonomy.from_codes(codes, ["species", "order"])
    with pytest.raises(FgembedError, match="no codes for level 'genus'"):
        Taxonomy.from_codes(codes, ["genus", "species"])


def test_heads_return_one_logit_tensor_per_level():
    x = torch.randn(7, 24)
    assert list_hierarchies() == ["disentangled", "independent", "shared"]
    for name in HIERARCHIES:
        out = create_hierarchy(name, 24, [3, 6, 18], hidden=(32, 16)).eval()(x)
        assert [tuple(z.shape) for z in out] == [(7, 3), (7, 6), (7, 18)]
    with pytest.raises(FgembedError, match="unknown hierarchy 'tree'; choose from disentangled"):
        create_hierarchy("tree", 24, [3, 6])
    with pytest.raises(FgembedError, match="cannot be split into 3"):
        DisentangledHeads(24, [3, 6, 18], hidden=(2,))


def _trunk_grads(model, loss):
    model.zero_grad()
    loss.backward(retain_graph=True)
    last = [m for m in model.trunk if isinstance(m, torch.nn.Linear)][-1]
    bn = [m for m in model.trunk if isinstance(m, torch.nn.BatchNorm1d)][-1]
    return last.weight.grad.clone(), last.bias.grad.clone(), bn.weight.grad.clone()


def test_disentangled_coarse_loss_puts_zero_gradient_on_finer_parts():
    torch.manual_seed(0)
    model = DisentangledHeads(24, [3, 6, 18], hidden=(32, 30), dropout=0.0).train()
    x, targets = torch.randn(64, 24), [torch.randint(0, c, (64,)) for c in (3, 6, 18)]
    logits = model(x)
    for k in range(3):
        loss = torch.nn.functional.cross_entropy(logits[k], targets[k])
        grads = _trunk_grads(model, loss)
        for j, part in enumerate(model.part_slices):
            norms = [g[part].abs().sum().item() for g in grads]
            if j > k:   # a finer part: exactly zero (stop-gradient)
                assert norms == [0.0, 0.0, 0.0], (k, j)
            elif j == k:  # its own part: trained
                assert all(n > 0 for n in norms), (k, j)
            else:       # a coarser part: not read by this head at all
                assert norms == [0.0, 0.0, 0.0], (k, j)
        # …while the head's own weights on the finer parts are trained (the reinforcement)
        model.zero_grad()
        loss.backward(retain_graph=True)
        width_own = model.part_slices[k].stop - model.part_slices[k].start
        if k < 2:
            assert model.heads[k].weight.grad[:, width_own:].abs().sum() > 0
    # the check can fail: without the split, the coarse loss does shape every unit
    shared = SharedTrunkHeads(24, [3, 6, 18], hidden=(32, 30), dropout=0.0).train()
    grads = _trunk_grads(shared, torch.nn.functional.cross_entropy(shared(x)[0], targets[0]))
    assert grads[0][20:].abs().sum() > 0


def test_hierarchical_loss_is_the_weighted_sum():
    logits = [torch.randn(5, 3), torch.randn(5, 6)]
    targets = [torch.randint(0, 3, (5,)), torch.randint(0, 6, (5,))]
    ce = [torch.nn.functional.cross_entropy(z, t) for z, t in zip(logits, targets)]
    assert torch.allclose(hierarchical_loss(logits, targets, [0.5, 2.0]), 0.5 * ce[0] + 2.0 * ce[1])
    assert torch.allclose(hierarchical_loss(logits, targets), ce[0] + ce[1])
    with pytest.raises(FgembedError, match="1 level weights for 2 levels"):
        hierarchical_loss(logits, targets, [1.0])


@pytest.mark.parametrize("name", sorted(HIERARCHIES))
def test_fit_levels_learns_every_level_from_float16(name):
    X, codes = make_features(n_per_class=24, noise=NOISE, seed=1)
    Xv, cv = make_features(n_per_class=8, noise=NOISE, seed=2)
    order = ["order", "family", "species"]
    ys, ys_val = [codes[k] for k in order], [cv[k] for k in order]
    fits = fit_levels(name, X.astype(np.float16), ys, Xv.astype(np.float16), ys_val, [3, 6, 18], seeds=[0, 1],
                      epochs=12, batch_size=64, hidden=(64, 48), dropout=0.1, lr=3e-3)
    assert [f.seed for f in fits] == [0, 1] and 0 <= fits[0].best_epoch < 12 and len(fits[0].history) == 12
    logits = predict_levels(fits[0].module, Xv.astype(np.float16))
    metrics = level_metrics(logits, ys_val, order)
    for level, z, y in zip(order, logits, ys_val):
        pred = z.argmax(1)
        assert metrics["levels"][level]["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert metrics["levels"][level]["f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
    accs = [metrics["levels"][k]["accuracy"] for k in order]
    reference = LogisticRegression(max_iter=2000).fit(X, ys[2]).score(Xv, ys_val[2])
    assert accs[0] > 0.95 and accs[1] > 0.9 and accs[2] > reference - 0.12, (accs, reference)
    assert metrics["avg_accuracy"] == pytest.approx(np.mean(accs))
    # best epoch by the mean of per-level val F1
    best = fits[0].history[fits[0].best_epoch]
    assert best["val_score"] == max(h["val_score"] for h in fits[0].history)
    assert best["val_score"] == pytest.approx(np.mean(best["val_f1"]))


def test_fit_levels_refuses_bad_input():
    X, codes = make_features(n_per_class=2)
    ys = [codes["order"], codes["species"]]
    with pytest.raises(FgembedError, match="unknown selection"):
        fit_levels("shared", X, ys, X, ys, [3, 18], select="best")
    with pytest.raises(FgembedError, match="one label per row at each of 2 levels"):
        fit_levels("shared", X, ys, X[:-1], ys, [3, 18], epochs=1)
    with pytest.raises(FgembedError, match=r"need 2 level weights ≥ 0 \(one per level\); got \[1.0\]"):
        fit_levels("shared", X, ys, X, ys, [3, 18], level_weights=[1.0])


def test_fit_levels_seed_alone_equals_seed_in_a_list():
    X, codes = make_features(n_per_class=4)
    ys = [codes["order"], codes["species"]]
    kw = {"epochs": 2, "batch_size": 16, "hidden": (16, 12), "level_weights": [0.5, 1.0], "device": "cpu"}
    pair = fit_levels("disentangled", X, ys, X, ys, [3, 18], seeds=[0, 1], **kw)
    alone = fit_levels("disentangled", X, ys, X, ys, [3, 18], seeds=[1], **kw)
    for a, b in zip(pair[1].module.state_dict().values(), alone[0].module.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(pair[0].module.trunk[0].weight, pair[1].module.trunk[0].weight)


def test_grid_keeps_per_seed_the_setting_that_wins_alone():
    X, codes = make_features(n_per_class=6, noise=NOISE)
    Xv, cv = make_features(n_per_class=3, noise=NOISE, seed=5)
    ys, ys_val = [codes["order"], codes["species"]], [cv["order"], cv["species"]]
    kw = {"epochs": 3, "batch_size": 16, "hidden": (16, 12), "device": "cpu", "seeds": [0, 1, 2]}
    grid = fit_levels_grid("shared", X, ys, Xv, ys_val, [3, 18], lrs=[1e-3, 3e-2], weight_decays=[0.0, 0.1], **kw)
    settings = [(lr, wd) for lr in (1e-3, 3e-2) for wd in (0.0, 0.1)]
    alone = {s: fit_levels("shared", X, ys, Xv, ys_val, [3, 18], lr=s[0], weight_decay=s[1], **kw) for s in settings}
    for k, fit in enumerate(grid):
        scores = [alone[s][k].best_val_score for s in settings]
        assert [g["best_val_score"] for g in fit.grid] == scores
        assert scores[0] != scores[-1]  # the grid has a choice to make
        winner = settings[int(np.argmax(scores))]  # ties: the first in lr-major order
        assert (fit.lr, fit.weight_decay) == winner and fit.chosen == {"lr": winner[0], "weight_decay": winner[1]}
        assert fit.best_val_score == pytest.approx(np.mean(fit.best_val_f1))  # select="mean"
        for a, b in zip(fit.module.state_dict().values(), alone[winner][k].module.state_dict().values()):
            assert torch.equal(a, b)
    with pytest.raises(FgembedError, match="distinct learning rates"):
        fit_levels_grid("shared", X, ys, Xv, ys_val, [3, 18], lrs=[1e-3, 1e-3], **kw)


def _random_logits(n: int = 200, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 2, (n, c)).astype(np.float32) for c in (3, 6, 18)]


def test_decoders_are_consistent_and_match_brute_force():
    tax, logits = taxonomy(), _random_logits()
    argmax = [z.argmax(1) for z in logits]
    assert consistency_rate(argmax, tax) < 0.5  # random levels rarely agree
    for decode in (decode_top_down, decode_path_product):
        assert consistency_rate(decode(logits, tax), tax) == 1.0
    logp = [torch.log_softmax(torch.as_tensor(z), 1).numpy() for z in logits]
    paths = tax.paths()
    path_score = sum(logp[k][:, paths[:, k]] for k in range(3))        # [n, 18]
    assert (decode_path_product(logits, tax)[2] == path_score.argmax(1)).all()
    expected = []
    for i in range(len(logits[0])):  # top-down by hand
        o = logp[0][i].argmax()
        f = max((c for c in range(6) if tax.parents(1)[c] == o), key=lambda c: logp[1][i, c])
        expected.append(max((c for c in range(18) if tax.parents(2)[c] == f), key=lambda c: logp[2][i, c]))
    assert decode_top_down(logits, tax)[2].tolist() == expected


def test_decoded_metrics_match_sklearn():
    tax, logits = taxonomy(), _random_logits(seed=1)
    fine = np.random.default_rng(2).integers(0, 18, 200)
    ys = [tax.ancestors(fine, "order"), tax.ancestors(fine, "family"), fine]
    preds = decode_path_product(logits, tax)
    m = decoded_metrics(preds, ys, tax)
    for level, pred, y in zip(tax.order, preds, ys):
        assert m["levels"][level]["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert m["levels"][level]["f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
        assert m["levels"][level]["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["accuracy"] == m["levels"]["species"]["accuracy"] and m["consistency"] == 1.0
    assert m["avg_accuracy"] == pytest.approx(np.mean([accuracy_score(y, p) for y, p in zip(ys, preds)]))
    assert m["mistake_severity"] == pytest.approx(mistake_severity(preds[2], fine, tax))
    assert decoded_metrics([fine // 6, fine // 3, fine], ys, tax)["mistake_severity"] is None  # no mistake


def test_mistake_severity_is_mean_lca_depth_over_mistakes():
    tax = taxonomy()
    true = np.array([0, 0, 0, 0, 7])
    pred = np.array([0, 1, 3, 17, 7])  # right; same family; same order; other order; right
    assert lca_depth(pred, true, tax).tolist() == [3, 2, 1, 0, 3]
    assert mistake_severity(pred, true, tax) == pytest.approx((2 + 1 + 0) / 3)
    assert np.isnan(mistake_severity(true, true, tax))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 18, 300), rng.integers(0, 18, 300)
    brute = [next((k for k in (3, 2, 1) if all(tax.paths()[x, :k] == tax.paths()[y, :k])), 0) for x, y in zip(a, b)]
    assert lca_depth(a, b, tax).tolist() == brute


def test_deepest_confident_level_and_its_curve(tmp_path):
    logits = _random_logits(seed=3)
    rng = np.random.default_rng(4)
    fine = rng.integers(0, 18, 200)
    ys = [fine // 6, fine // 3, fine]
    curve = selective_curve(logits, ys, taus=[0.0, 0.3, 1.01])
    accs = [accuracy_score(y, z.argmax(1)) for y, z in zip(ys, logits)]
    assert curve["specificity"][0] == 1.0 and curve["accuracy"][0] == pytest.approx(accs[2])   # all species
    assert curve["specificity"][-1] == pytest.approx(1 / 3) and curve["accuracy"][-1] == pytest.approx(accs[0])
    level, pred = deepest_confident(logits, 0.3)
    probs = [torch.softmax(torch.as_tensor(z), 1).numpy() for z in logits]
    for i in range(200):  # by hand: species if confident, else family, else order
        k = next((k for k in (2, 1) if probs[k][i].max() >= 0.3), 0)
        assert (level[i], pred[i]) == (k, probs[k][i].argmax())
    assert curve["fine_fraction"][1] == pytest.approx(np.mean(level == 2))
    points = selective_points(logits, ys)
    assert list(points)[:3] == ["tau00", "tau30", "tau50"] and len(points) == len(SELECTIVE_TAUS)
    assert curve_of_points(points) == {"tau": list(SELECTIVE_TAUS), **{
        k: v for k, v in selective_curve(logits, ys, SELECTIVE_TAUS).items() if k != "tau"}}
    png = plot_selective_curve({"random": curve}, tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_taxonomy_from_store(cub_root, tmp_path):
    from fgembed.datasets import load_dataset
    from fgembed.store import FeatureStore

    store = FeatureStore.create(tmp_path / "cub.zarr", load_dataset("cub", cub_root))
    tax = Taxonomy.from_store(store, ["order", "family", "species"])
    fine = store.labels()
    assert (tax.ancestors(fine, "family") == store.labels(level="family")).all()
    assert tax.n_classes["species"] == len(store.class_names)
    assert tax.n_classes["family"] == len(store.samples_attrs["levels"]["family"])
    with pytest.raises(FgembedError, match="no taxonomy level 'genus'"):
        Taxonomy.from_store(store, ["genus", "species"])


def test_consistent_rows_mark_each_row():
    tax = taxonomy()
    rng = np.random.default_rng(3)
    fine = rng.integers(0, 18, 200)
    preds = [rng.integers(0, 3, 200), rng.integers(0, 6, 200), fine]
    preds[1][:100] = fine[:100] // SPECIES_PER_FAMILY  # half the rows: the right family
    preds[0][:50] = preds[1][:50] // FAMILIES_PER_ORDER
    brute = [p1 == f // SPECIES_PER_FAMILY and p0 == f // (SPECIES_PER_FAMILY * FAMILIES_PER_ORDER)
             for p0, p1, f in zip(*preds)]
    assert consistent_rows(preds, tax).tolist() == brute and sum(brute) >= 50
    assert consistency_rate(preds, tax) == pytest.approx(np.mean(brute))


@pytest.mark.parametrize("args, selection", [(["--levels", "group,species"], "f1_weighted (mean over levels)"),
                                             (["--balance", "loss"], "f1_macro"),
                                             ([], "f1_weighted")])
def test_grid_fit_prints_the_selection_its_config_records(tmp_path, args, selection):
    """`fgembed fit --lr a,b` says what chose each seed's setting as config.json records it: a
    multi-level run chooses by the mean over levels of weighted F1, --balance by macro F1."""
    import json

    from fgembed.cli.main import app
    from typer.testing import CliRunner

    from fgembed.classify.rundir import Run

    from .formats import write_feature_store

    store = write_feature_store(tmp_path / "f.zarr")
    argv = ["fit", "--store", str(store.path), "--features", "a", "--epochs", "2", "--lr", "1e-3,3e-3",
            "--seeds", "0,1", "--runs", str(tmp_path / "runs"), "--quiet", *args]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    run, = (Run.load(p) for p in (tmp_path / "runs").iterdir() if (p / "metrics.json").is_file())
    assert json.loads((run.path / "config.json").read_text())["selection"] == selection
    chosen = [line for line in result.stdout.splitlines() if line.startswith("chosen on validation")]
    assert len(chosen) == 1 and chosen[0].startswith(f"chosen on validation {selection}: seed 0: lr "), chosen
    assert "F1 (weighted)" not in chosen[0]
    again = CliRunner().invoke(app, argv)  # a reused run prints what it recorded, too
    assert "reused" in again.stdout and chosen[0] in again.stdout.splitlines()
