"""Long-tail runs: by_frequency in metrics.json, the --balance modes inside the batched grid,
and their usage errors."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from fgembed.cli.main import main
from sklearn.metrics import f1_score
from torch import nn

from fgembed.classify import train
from fgembed.classify.longtail import by_frequency, class_balanced_weights, log_prior
from fgembed.classify.config import HeadConfig, RunConfig
from fgembed.classify.fitting import fit_run
from fgembed.classify.train import BALANCES, train_grid, weighted_f1
from fgembed.classify.views import ViewConfig
from fgembed.errors import FgembedError

COUNTS = np.array([120, 60, 30, 25, 8, 5, 3])  # train rows per class: many, medium ×3, few ×3 at (20, 100)
FAST = {"epochs": 3, "batch_size": 32, "hidden": (16,)}


def write_long_tail_store(path, counts=COUNTS, d: int = 12, seed: int = 0):
    """Train rows per class as given; val and test have 6 rows per class (so every bin is scored)."""
    from fgembed.datasets.table import SampleTable
    from fgembed.store import FeatureStore

    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.repeat(np.arange(len(counts)), counts), np.repeat(np.arange(len(counts)), 12)])
    split = np.concatenate([np.zeros(counts.sum(), np.uint8), np.tile([1, 2], 6 * len(counts)).astype(np.uint8)])
    n = len(labels)
    table = SampleTable("longtail", "/nowhere", np.arange(1, n + 1), [f"c{y}/{i}.jpg" for i, y in enumerate(labels)],
                        labels, [f"class {c}" for c in range(len(counts))], split, {})
    store = FeatureStore.create(path, table, shard_rows=256)
    emb = rng.normal(size=(len(counts), d))[labels] * 1.5 + rng.normal(size=(n, d))
    store.prepare("a", {"source": "test", "member": "a"}, d, dtype="float32")
    for shard in range(store.n_shards):
        rows = store.shard_slice(shard)
        store.write_shard("a", shard, emb[rows], np.zeros(len(emb[rows]), np.uint8))
    store.mark_complete("a", None)
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_long_tail_store(tmp_path_factory.mktemp("longtail") / "lt.zarr")


def config(**head) -> RunConfig:
    return RunConfig(ViewConfig(features=("a",)), HeadConfig(**{**FAST, **head}))


def test_by_frequency_matches_the_stored_test_logits(store, tmp_path):
    run = fit_run(store, config(seeds=(0, 1), shot_bins=(10, 50)), tmp_path)
    rows, logits = run.logits("test")
    y = store.labels()[rows]
    per_seed = [by_frequency(y, z.astype(np.float32).argmax(1), COUNTS, (10, 50)) for z in logits]
    assert not any(np.isnan(b["accuracy"]) for m in per_seed for b in m.values())  # every bin is scored here
    saved = json.loads((run.path / "metrics.json").read_text())
    assert [m["by_frequency"] for m in saved["per_seed"]] == per_seed
    for name in ("many", "medium", "few"):
        accs = [m[name]["accuracy"] for m in per_seed]
        assert saved["by_frequency"][name]["accuracy"] == pytest.approx(np.mean(accs))
        assert saved["by_frequency"][name]["accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert {k: saved["by_frequency"][k]["n_classes"] for k in ("many", "medium", "few")} == \
        {"many": 2, "medium": 2, "few": 3}
    assert saved["by_frequency"]["few"]["n_test"] == 3 * 6
    assert json.loads((run.path / "config.json").read_text())["selection"] == "f1_weighted"


@pytest.mark.parametrize("balance", ["loss", "sampler", "logit-adjust", "second-stage"])
def test_each_balance_trains_and_is_recorded(store, tmp_path, balance):
    run = fit_run(store, config(balance=balance), tmp_path)
    meta = json.loads((run.path / "config.json").read_text())
    assert meta["config"]["head"]["balance"] == balance and meta["selection"] == "f1_macro"
    history = run.history()["0"]
    assert len(history) == FAST["epochs"] + (train.SECOND_STAGE_EPOCHS if balance == "second-stage" else 0)
    # the kept epoch is the one with the best validation macro F1 (what history records under a balance)
    assert run.metrics["best_epoch"][0] == int(np.argmax([h["val_f1"] for h in history]))
    assert run.path != fit_run(store, config(), tmp_path).path  # balance is in the key


def test_macro_f1_on_device_equals_scikit_learn():
    rng = np.random.default_rng(1)
    y, pred = rng.integers(0, 7, 200), rng.integers(0, 9, (3, 200))
    got = weighted_f1(torch.as_tensor(y), torch.as_tensor(pred), 9, "macro").numpy()
    assert got == pytest.approx([f1_score(y, p, average="macro") for p in pred])


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    y = torch.as_tensor(np.repeat(np.arange(len(COUNTS)), COUNTS))
    X = torch.as_tensor(rng.normal(size=(len(y), 10)), dtype=torch.float32) + y[:, None] * 0.3
    return X, y


def test_sampler_batches_are_class_balanced(monkeypatch):
    X, y = _data()
    drawn = []
    original = train.balanced_order

    def record(labels, n_classes, generator):
        order = original(labels, n_classes, generator)
        drawn.append(labels[order])
        return order

    monkeypatch.setattr(train, "balanced_order", record)
    make = lambda: nn.Linear(10, len(COUNTS))  # noqa: E731
    train_grid(make, X, y, X, y, len(COUNTS), [0, 1], [1e-3], [0.0], epochs=20, batch_size=64, balance="sampler")
    assert len(drawn) == 20 * 2  # one draw per epoch per head
    share = np.bincount(torch.cat(drawn).numpy(), minlength=len(COUNTS)) / (len(drawn) * len(y))
    assert share == pytest.approx(np.full(len(COUNTS), 1 / len(COUNTS)), abs=0.02)
    assert np.bincount(y.numpy())[-1] / len(y) < 0.02  # while the rarest class is 1 % of the data


@pytest.mark.parametrize("balance", ["loss", "logit-adjust"])
def test_one_full_batch_step_loss_equals_the_manual_cross_entropy(balance):
    X, y = _data()
    make = lambda: nn.Linear(10, len(COUNTS))  # noqa: E731
    result = train_grid(make, X, y, X, y, len(COUNTS), [3], [1e-3], [0.0], epochs=1, batch_size=len(y),
                        balance=balance)[0][0]
    torch.manual_seed(3)
    logits = make()(X)
    counts = np.bincount(y.numpy())
    if balance == "loss":
        expected = nn.CrossEntropyLoss(weight=class_balanced_weights(counts))(logits, y)
    else:
        expected = nn.CrossEntropyLoss()(logits + log_prior(counts), y)
    assert result.history[0]["train_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() != pytest.approx(nn.CrossEntropyLoss()(logits, y).item(), rel=1e-3)


@pytest.mark.parametrize("balance", ["sampler", "second-stage"])
def test_balanced_head_in_a_grid_equals_the_head_trained_alone(balance):
    X, y = _data()
    make = lambda: nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, len(COUNTS)))  # noqa: E731
    grid = train_grid(make, X, y, X, y, len(COUNTS), [0, 1], [1e-3, 3e-3], [0.0], epochs=3, batch_size=32,
                      balance=balance)
    alone = train_grid(make, X, y, X, y, len(COUNTS), [1], [3e-3], [0.0], epochs=3, batch_size=32, balance=balance)
    for name, tensor in alone[0][0].state_dict.items():
        torch.testing.assert_close(grid[1][1].state_dict[name], tensor, atol=1e-5, rtol=1e-5)


def test_bad_balance_and_shot_bins_are_one_line_errors(store, capsys):
    """Through `fgembed.cli.main.main`, the console script's entry (the FgembedError → exit 2 path)."""
    for args, needle in ((["--balance", "oversample"], "unknown --balance"),
                         (["--shot-bins", "20"], "--shot-bins"),
                         (["--shot-bins", "50,10"], "--shot-bins"),
                         (["--head", "knn", "--balance", "loss"], "not trained")):
        assert main(["fit", "--store", str(store.path), "--features", "a", *args]) == 2, args
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in captured.out + captured.err, lines
    with pytest.raises(FgembedError):
        train_grid(lambda: nn.Linear(2, 2), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.zeros(4, 2),
                   torch.zeros(4, dtype=torch.long), 2, [0], [1e-3], [0.0], epochs=1, batch_size=2, balance="x")
    assert set(BALANCES) == {"none", "loss", "sampler", "logit-adjust", "second-stage"}


def test_ensemble_cost_sums_members_and_marks_the_pareto_front(tmp_path, capsys):
    """`fgembed ensemble --cost --by-frequency`: the GMACs column is the sum of the members' stored
    gmacs (a member never benchmarked: one warning line, –), the front is the non-dominated set."""
    from fgembed.analysis.report import combine_costs, pareto_front
    from fgembed.extraction.bench import CostResult, write_cost

    from .formats import write_feature_store

    store = write_feature_store(tmp_path / "f.zarr")
    gmacs = {"a": 1.5, "b": 4.0}
    for name, g in gmacs.items():
        fields = {f.name: 1.0 for f in dataclasses.fields(CostResult)}  # timings: any number
        write_cost(store, CostResult(**{**fields, "backbone": name, "gmacs": g, "gflops": 2 * g, "params": 10,
                                        "input_shape": None, "throughput": 100.0 / g, "device": "cpu",
                                        "precision": "fp32"}))
    argv = ["ensemble", "--store", str(store.path), "--members", "a,b,c", "--strategies", "late,concat",
            "--combinations", "all", "--epochs", "2", "--runs", str(tmp_path / "runs"), "--format", "json",
            "--cost", "--by-frequency", "--shot-bins", "30,60", "--quiet"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    warning = [line for line in captured.err.splitlines() if "no cost" in line]
    assert len(warning) == 1 and "fgembed bench --backbone c --store" in warning[0]
    for r in rows:
        expected = None if "c" in r["members"] else sum(gmacs[m] for m in r["members"])
        assert r["gmacs"] == (pytest.approx(expected) if expected is not None else None), r
        if r["strategy"] != "late":  # ~24 train rows per class: all "few" under --shot-bins 30,60
            assert r["n_classes_few"] == 6 and r["acc_few"] is not None and r["acc_many"] is None
    assert (tmp_path / "runs" / "ensemble-pareto.png").stat().st_size > 0
    assert "| – |" in (tmp_path / "runs" / "ensemble.md").read_text()
    assert combine_costs([None, {"gmacs": 1.0}])["gmacs"] is None
    rng = np.random.default_rng(0)
    cost, score = list(rng.integers(1, 6, 40).astype(float)), list(rng.integers(0, 8, 40).astype(float))
    brute = [all(not (cost[j] <= cost[i] and score[j] >= score[i] and (cost[j], score[j]) != (cost[i], score[i]))
                 for j in range(40)) for i in range(40)]
    assert pareto_front(cost, score) == brute and any(brute) and not all(brute)


def add_member(store, name: str, d: int, seed: int, failed=()) -> None:
    """Another member of the long-tailed store: the same classes through its own projection;
    `failed` rows are NaN with status unreadable, as extraction writes a failed image."""
    from fgembed.images import UNREADABLE

    rng = np.random.default_rng(seed)
    labels = store.labels()
    emb = rng.normal(size=(labels.max() + 1, d))[labels] * 1.5 + rng.normal(size=(len(labels), d))
    status = np.zeros(len(labels), np.uint8)
    emb[list(failed)], status[list(failed)] = np.nan, UNREADABLE
    store.prepare(name, {"source": "test", "member": name}, d, dtype="float32")
    for shard in range(store.n_shards):
        rows = store.shard_slice(shard)
        store.write_shard(name, shard, emb[rows], status[rows])
    store.mark_complete(name, None)


def test_late_fusion_by_frequency_equals_numpy_on_stored_logits(tmp_path):
    """`fgembed ensemble --strategies late --by-frequency`: each late row's many/medium/few
    accuracy equals `by_frequency` of the argmax of the members' averaged probabilities (from
    their stored float16 logits), binned by the training rows all its members have: member c lost
    a training row of class 3 (25 → 24 rows), so under --shot-bins 25,50 class 3 is medium
    without c and few with it."""
    from fgembed.cli.main import app
    from scipy.special import softmax
    from typer.testing import CliRunner

    from fgembed.analysis.ensemble import late_entries
    from fgembed.analysis.plan import Combination
    from fgembed.classify.rundir import Run

    store = write_long_tail_store(tmp_path / "lt.zarr")
    labels, split = store.labels(), store.group["samples/split"][:]
    lost_train = np.flatnonzero((labels == 3) & (split == 0))[0]
    add_member(store, "b", 10, seed=1)
    add_member(store, "c", 8, seed=2, failed=[lost_train, np.flatnonzero(split == 2)[0]])
    result = CliRunner().invoke(app, ["ensemble", "--store", str(store.path), "--members", "a,b,c", "--strategies",
                                      "late", "--late-mode", "proba", "--by-frequency", "--shot-bins", "25,50",
                                      "--epochs", "3", "--seeds", "0,1", "--runs", str(tmp_path / "runs"),
                                      "--format", "json", "--quiet"])
    assert result.exit_code == 0, result.output
    late = [r for r in json.loads(result.stdout) if r["strategy"] == "late"]
    assert len(late) == 4
    for record in late:
        runs = [Run.load(p) for p in record["runs"]]
        ok = split == 0
        for run in runs:
            ok &= store.status(run.config.view.features[0]) == 0
        counts = np.bincount(labels[ok], minlength=len(COUNTS))
        assert counts[3] == (24 if "c" in record["members"] else 25)
        parts = [run.logits("test") for run in runs]
        common = parts[0][0]
        for rows, _ in parts[1:]:
            common = np.intersect1d(common, rows)
        y = labels[common]
        entry, = late_entries(store, dict(zip(record["members"], runs)), [Combination("late", tuple(record["members"]))],
                              None, "proba", "equal")
        for k, ours in enumerate(entry.metrics["per_seed"]):
            fused = np.mean([softmax(z[k][np.searchsorted(rows, common)].astype(np.float32), 1) for rows, z in parts], 0)
            for name, ref in by_frequency(y, fused.argmax(1), counts, (25, 50)).items():
                got = ours["by_frequency"][name]
                assert (got["n_classes"], got["n_test"]) == (ref["n_classes"], ref["n_test"])
                # float16 ties may flip an argmax: a couple of rows of tolerance
                assert got["accuracy"] == pytest.approx(ref["accuracy"], abs=2.5 / ref["n_test"])
        few = 4 if "c" in record["members"] else 3
        assert (record["n_classes_many"], record["n_classes_medium"], record["n_classes_few"]) == (2, 5 - few, few)
        assert record["acc_few"] == pytest.approx(np.mean([m["by_frequency"]["few"]["accuracy"]
                                                           for m in entry.metrics["per_seed"]]))
    single_c = json.loads((tmp_path / "runs" / "ensemble.json").read_text())
    assert next(r for r in single_c if r["key"] == "single:c")["n_classes_few"] == 4  # as c's own run bins it
