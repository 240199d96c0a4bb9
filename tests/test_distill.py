"""`fgembed distill`: top-k soft targets, the distillation loss in the batched grid, distilled runs."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.special import log_softmax as np_log_softmax
from scipy.special import softmax as np_softmax
from torch.nn import functional as F

from fgembed.classify.config import HeadConfig, RunConfig
from fgembed.classify.distill import distill, fill_targets, plain_config, teacher_config, training_targets
from fgembed.classify.fitting import fit_run, run_path
from fgembed.classify.heads import MLPHead
from fgembed.classify.soft_targets import TargetBuilder
from fgembed.classify.train import train_grid
from fgembed.classify.views import ViewConfig, build_view
from fgembed.cli.main import main
from fgembed.errors import FgembedError

from .formats import write_feature_store

FAST = {"epochs": 12, "batch_size": 32, "seeds": (0, 1)}
T = 3.0


def student(*features: str, teacher=("a", "b"), fusion: str = "single", **head) -> RunConfig:
    return RunConfig(ViewConfig(features=features, fusion=fusion),
                     HeadConfig(**{**FAST, "teacher": teacher, "temperature": T, **head}))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_feature_store(tmp_path_factory.mktemp("distill") / "f.zarr")


@pytest.fixture(scope="module")
def distilled(store, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return runs, distill(store, student("c", kd_alpha=1.0), runs, device="cpu")


def dense_target(builder_or_targets, seed: int, n_classes: int) -> np.ndarray:
    """The targets of one seed as a dense [rows, classes] matrix: top-k probabilities, the residual
    spread over the other allowed classes."""
    t = builder_or_targets
    idx, p = t.indices[seed].long().numpy(), t.probs[seed].float().numpy()
    allowed = np.ones(n_classes, bool) if t.allowed is None else t.allowed.numpy()
    out = np.zeros((len(idx), n_classes))
    if t.spread:
        out[:, allowed] = (t.residual[seed].numpy() / t.spread)[:, None]
    np.put_along_axis(out, idx, p, axis=1)
    return out


def numpy_target(scores: np.ndarray, k: int, excluded=()) -> np.ndarray:
    """The same construction from teacher scores in float64 numpy: softmax at T over the allowed
    classes, the k largest kept (rounded to float16), the rest of the mass spread evenly."""
    allowed = np.ones(scores.shape[1], bool)
    allowed[list(excluded)] = False
    p = np.zeros_like(scores, dtype=np.float64)
    p[:, allowed] = np_softmax(scores[:, allowed].astype(np.float64) / T, axis=1)
    k = min(k, int(allowed.sum()))
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(p, top, 1).astype(np.float16).astype(np.float64)
    out = np.zeros_like(p)
    spread = int(allowed.sum()) - k
    if spread:
        out[:, allowed] = (np.clip(1 - kept.sum(1), 0, None) / spread)[:, None]
    np.put_along_axis(out, top, kept, axis=1)
    return out


# ---- the loss ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, excluded", [(7, ()), (50, ()), (3, ()), (3, (1, 5))])
def test_top_k_loss_equals_the_dense_kl_of_its_target(k, excluded):
    """k ≥ classes: the dense KL(p_T ‖ q_T) of the teacher's own softmax (float16 rounding aside);
    fewer: the dense KL against the top-k target with the rest spread — both computed directly
    with torch's kl_div, gradients included, head g = k·S + s against seed s's targets."""
    rng = np.random.default_rng(0)
    S, N, C, settings, B, alpha = 2, 30, 7, 3, 8, 0.7
    teacher = torch.as_tensor(rng.normal(scale=3, size=(S, N, C)), dtype=torch.float32)
    builder = TargetBuilder(S, N, C, k, T, np.array(excluded, np.int64))
    builder.add(slice(0, 20), teacher[:, :20])
    builder.add(slice(20, N), teacher[:, 20:])
    targets = builder.finish(alpha)
    idx = torch.as_tensor(rng.integers(0, N, size=(S, B)))
    logits = torch.as_tensor(rng.normal(size=(settings * S, B, C)), dtype=torch.float32).requires_grad_()
    ce = torch.as_tensor(rng.random((settings * S, B)), dtype=torch.float32)
    loss = targets.loss(logits, ce, idx)
    loss.sum().backward()
    dense = torch.as_tensor(np.stack([dense_target(targets, s, C) for s in range(S)]))  # [S, N, C]
    if k >= C:  # nothing approximated: the teacher's own tempered softmax
        torch.testing.assert_close(dense, torch.softmax(teacher.double() / T, 2), rtol=2e-3, atol=1e-4)
    else:
        for s in range(S):
            np.testing.assert_allclose(dense[s].numpy(), numpy_target(teacher[s].numpy(), k, excluded), atol=1e-6)
    reference = logits.detach().clone().requires_grad_()
    g_seed = [g % S for g in range(settings * S)]
    target = torch.stack([dense[s][idx[s]] for s in g_seed]).float()  # [G, B, C]
    kl = F.kl_div(torch.log_softmax(reference / T, 2), target, reduction="none").sum(2)
    expected = alpha * T * T * kl + (1 - alpha) * ce
    expected.sum().backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits.grad, reference.grad, rtol=1e-4, atol=1e-6)
    assert (kl >= -1e-6).all()


def _grid_data(rng, n=96, d=10, c=5):
    y = np.arange(n) % c
    X = torch.as_tensor(rng.normal(size=(n, d)) + np.eye(c, d)[y] * 2, dtype=torch.float32)
    return X, torch.as_tensor(y)


def test_distilled_grid_head_equals_the_head_trained_alone():
    """Seeds × lrs with soft targets in one batched pass: each head equals the head trained alone
    on its own seed's targets (the gather order of the grid is the stacked heads' order)."""
    rng = np.random.default_rng(1)
    X, y = _grid_data(rng)
    teacher = torch.as_tensor(rng.normal(scale=2, size=(2, len(X), 5)), dtype=torch.float32)
    builder = TargetBuilder(2, len(X), 5, 3, T)
    builder.add(slice(0, len(X)), teacher)
    both = builder.finish(0.8)
    alone = dataclasses.replace(both, indices=both.indices[1:], probs=both.probs[1:], residual=both.residual[1:],
                                neg_entropy=both.neg_entropy[1:])
    make = lambda: MLPHead(hidden=(16,))._build(10, 5)  # noqa: E731
    kwargs = {"epochs": 3, "batch_size": 16, "cuda_graphs": False}
    grid = train_grid(make, X, y, X[:40], y[:40], 5, [0, 1], [1e-3, 3e-3], [0.01], soft_targets=both, **kwargs)
    single = train_grid(make, X, y, X[:40], y[:40], 5, [1], [3e-3], [0.01], soft_targets=alone, **kwargs)
    plain = train_grid(make, X, y, X[:40], y[:40], 5, [1], [3e-3], [0.01], **kwargs)
    for name, value in single[0][0].state_dict.items():
        torch.testing.assert_close(grid[1][1].state_dict[name], value, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain[0][0].state_dict["0.weight"], single[0][0].state_dict["0.weight"])


def test_alpha_zero_is_exactly_the_plain_loss():
    rng = np.random.default_rng(2)
    X, y = _grid_data(rng)
    builder = TargetBuilder(1, len(X), 5, 2, T)
    builder.add(slice(0, len(X)), torch.as_tensor(rng.normal(size=(1, len(X), 5)), dtype=torch.float32))
    make = lambda: MLPHead(hidden=(16,))._build(10, 5)  # noqa: E731
    kwargs = {"epochs": 2, "batch_size": 16, "cuda_graphs": False}
    zero = train_grid(make, X, y, X, y, 5, [0], [1e-3], [0.01], soft_targets=builder.finish(0.0), **kwargs)
    plain = train_grid(make, X, y, X, y, 5, [0], [1e-3], [0.01], **kwargs)
    for name, value in plain[0][0].state_dict.items():
        assert torch.equal(zero[0][0].state_dict[name], value), name
    assert [h["train_loss"] for h in zero[0][0].history] == [h["train_loss"] for h in plain[0][0].history]


# ---- teacher targets from the member runs ---------------------------------------------------------------------


def _stored_target(teachers, split: str, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, dense target of `seed`) from the teacher runs' stored float16 logits, in numpy."""
    rows = teachers[0].rows(split)
    fused = np.mean([run.logits(split)[1][seed].astype(np.float64) for run in teachers], axis=0)
    return rows, numpy_target(fused, k)


@pytest.mark.parametrize("k", [6, 2])
def test_targets_on_val_rows_equal_the_late_fusion_of_stored_logits(distilled, store, k):
    """Computed from the saved heads on val rows, the targets are what numpy makes of the runs'
    stored val logits (the late rule: mean of the members' logits, seed by seed)."""
    _, result = distilled
    rows = result.teachers[0].rows("val")
    builder = TargetBuilder(2, len(rows), 6, k, T)
    fill_targets(builder, store, result.teachers, rows, device="cpu")
    for seed in (0, 1):
        stored_rows, expected = _stored_target(result.teachers, "val", k, seed)
        np.testing.assert_array_equal(stored_rows, rows)
        np.testing.assert_allclose(dense_target(builder, seed, 6), expected, atol=2e-3)


def test_training_targets_equal_a_numpy_recomputation_from_the_heads(distilled, store):
    """Train rows have no stored logits: the targets equal the heads' own forward (predict_logits
    on the store's features, float16 as stored) fused and tempered in numpy."""
    _, result = distilled
    config = student("c", kd_top_k=2)
    view, targets = training_targets(store, build_view(store, config.view), result.teachers, config, device="cpu")
    rows = view.rows["train"]
    assert targets.n_rows == len(rows) and targets.n_seeds == 2 and targets.spread == 4
    for seed in (0, 1):
        logits = [run.load_heads()[seed].predict_logits(store.features(run.config.view.features[0])[rows])
                  .astype(np.float16).astype(np.float64) for run in result.teachers]
        np.testing.assert_allclose(dense_target(targets, seed, 6), numpy_target(np.mean(logits, 0), 2), atol=2e-3)
    assert targets.record["teacher_runs"] == [str(r.path) for r in result.teachers]


def test_rows_failed_in_a_teacher_member_are_dropped_and_counted(store, tmp_path):
    """`c` failed on a test row only; a store whose teacher member failed on training rows drops
    them from the student's training rows (no target) and counts them."""
    from fgembed.images import UNREADABLE

    bad = write_feature_store(tmp_path / "bad.zarr")
    train = np.flatnonzero(bad.split_codes() == 0)[:3]
    status = bad.status("c").copy()
    status[train] = UNREADABLE
    emb = np.array(bad.embeddings("c"))
    emb[train] = np.nan
    bad.prepare("c2", {"source": "test", "member": "c2"}, emb.shape[1], dtype="float32")
    for shard in range(bad.n_shards):
        rows = bad.shard_slice(shard)
        bad.write_shard("c2", shard, emb[rows], status[rows])
    bad.mark_complete("c2", None)
    result = distill(bad, student("a", teacher=("b", "c2"), epochs=2), tmp_path / "runs", device="cpu")
    assert result.student.metrics["dropped"]["train"] == 3 and result.plain.metrics["dropped"]["train"] == 0
    assert result.student.metrics["n_train"] == result.plain.metrics["n_train"] - 3


# ---- distilled runs -----------------------------------------------------------------------------------------


def test_alpha_zero_distilled_run_equals_the_plain_run(distilled, store):
    """α = 0 through the whole fit path: same rows, same seeds → the plain run's weights and metrics."""
    runs, _ = distilled
    result = distill(store, student("c", kd_alpha=0.0), runs, device="cpu")
    assert result.student.path != result.plain.path
    for seed in FAST["seeds"]:
        zero = load_file(result.student.path / f"head-seed{seed}.safetensors")
        plain = load_file(result.plain.path / f"head-seed{seed}.safetensors")
        assert all(torch.equal(zero[k], plain[k]) for k in plain)
    assert result.student.metrics["per_seed"] == result.plain.metrics["per_seed"]


def test_the_student_fits_the_teacher_closer_than_its_plain_head(distilled, store):
    """α = 1: trained on the teacher's targets alone, the student's tempered softmax on the
    training rows is nearer (KL) the teacher's than the plain head's is — numpy throughout."""
    _, result = distilled
    train = np.flatnonzero(store.split_codes() == 0)
    X = store.features("c")
    teacher = np.mean([run.load_heads()[0].predict_logits(store.features(run.config.view.features[0])[train])
                       for run in result.teachers], 0)
    p = np_softmax(teacher / T, 1)

    def kl(run) -> float:
        q = np_log_softmax(run.load_heads()[0].predict_logits(X[train]) / T, 1)
        return float((p * (np.log(p) - q)).sum(1).mean())

    assert kl(result.student) < kl(result.plain)
    assert result.student.meta["distillation"]["top_k"] == 6
    assert result.student.config.head.teacher == ("a", "b")


def test_a_finished_student_is_reused_and_its_key_holds_the_teacher(distilled, store):
    runs, result = distilled
    again = distill(store, student("c", kd_alpha=1.0), runs, device="cpu")
    assert again.student.reused and again.plain.reused and again.student.path == result.student.path
    other = run_path(store, student("c", teacher=("a",), kd_alpha=1.0), runs)[0]
    assert other != result.student.path and "distilled" in result.student.path.name
    # a teacher config is the single run ensemble trains for that member; the plain config has no teacher
    assert teacher_config(student("c"), "a").view.features == ("a",)
    assert plain_config(student("c")).head == HeadConfig(**FAST)


def test_fit_run_refuses_a_distilled_config_without_targets(store, tmp_path):
    with pytest.raises(FgembedError, match="fgembed distill"):
        fit_run(store, student("c"), tmp_path, device="cpu")


# ---- the command ----------------------------------------------------------------------------------------------


def _cli(capsys, *args: str, code: int = 0) -> str:
    assert main([str(a) for a in args]) == code, capsys.readouterr().err
    return capsys.readouterr().out


def test_command_reports_student_teacher_plain_and_backbones(distilled, store, capsys):
    runs, result = distilled
    base = ["distill", "--store", store.path, "--teacher", "a,b", "--student", "c", "--runs", runs, "--device", "cpu",
            "--epochs", FAST["epochs"], "--batch-size", FAST["batch_size"], "--seeds", "0,1", "--temperature", T,
            "--kd-alpha", "1", "--quiet"]
    report = json.loads(_cli(capsys, *base, "--json"))
    assert report["student"]["runs"] == [str(result.student.path)] and report["student"]["backbones"] == ["c"]
    assert report["teacher"]["backbones"] == ["a", "b"] and report["plain"]["runs"] == [str(result.plain.path)]
    assert report["student"]["accuracy"] == pytest.approx(result.student.metrics["accuracy"])
    # the teacher's accuracy: the late fusion of the stored test logits, seed by seed, in numpy
    y = store.labels()
    accuracy = []
    for seed in (0, 1):
        rows = result.teachers[0].rows("test")
        keep = np.isin(rows, result.teachers[1].rows("test"))
        fused = np.mean([run.logits("test")[1][seed][np.isin(run.rows("test"), rows[keep])].astype(np.float32)
                         for run in result.teachers], 0)
        accuracy.append((fused.argmax(1) == y[rows[keep]]).mean())
    assert report["teacher"]["accuracy"] == pytest.approx(np.mean(accuracy))
    assert report["student"]["delta_accuracy"] == pytest.approx(report["student"]["accuracy"]
                                                                - report["plain"]["accuracy"])
    lo, hi = report["teacher"]["accuracy_ci"]
    assert lo <= report["teacher"]["accuracy"] <= hi and report["student"]["delta_accuracy_vs"] == "plain"
    bare = json.loads(_cli(capsys, *base, "--json", "--bootstrap", "0"))
    assert "accuracy_ci" not in bare["teacher"] and not any(k.startswith("delta_") for k in bare["student"])
    text = _cli(capsys, *base)
    lines = text.splitlines()
    assert lines[0].startswith("c-distilled: reused finished run")
    assert any(line.startswith("teacher ") and "2: a + b" in line for line in lines)
    assert any(line.startswith("student ") and "1: c" in line for line in lines)
    assert "of the teacher's" in text or "nothing to keep" in text
    assert all(len(line) <= 100 for line in lines)


def test_command_defaults_are_the_config_defaults():
    from cli.distill import DISTILL_DEFAULTS

    head = HeadConfig(teacher=("a",))
    assert DISTILL_DEFAULTS == {"temperature": head.temperature, "kd_alpha": head.kd_alpha, "kd_top_k": head.kd_top_k}
    assert (head.temperature, head.kd_alpha, head.kd_top_k) == (4.0, 0.9, 64)  # Hinton et al.'s T, α; k documented


@pytest.mark.parametrize("args, message", [
    (["--teacher", "a,nope"], "nope"),
    (["--teacher", "c"], "the student's own plain head"),
    (["--kd-alpha", "1.5"], "--kd-alpha"),
    (["--kd-alpha", "-0.1"], "--kd-alpha"),
    (["--kd-alpha", "0"], "plain head"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--kd-top-k", "0"], "--kd-top-k"),
    (["--head", "knn"], "not trained"),
    (["--balance", "loss"], "no such option"),
    (["--teacher", "a,a"], "named twice"),
    (["--teacher", ","], "at least one member"),
])
def test_bad_requests_are_one_line_and_exit_2(store, tmp_path, capsys, args, message):
    given = dict(zip(args[::2], args[1::2]))
    argv = ["distill", "--store", store.path, "--runs", tmp_path, "--epochs", "1", "--quiet",
            "--teacher", given.pop("--teacher", "a,b"), "--student", "c", *[t for kv in given.items() for t in kv]]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message.lower() in err.lower(), err
    assert not any(Path(tmp_path).iterdir())  # refused before any run was trained


def test_a_student_is_a_row_of_an_ensemble_table_read_against_its_plain_head(distilled, store, capsys):
    """`ensemble --run STUDENT`: the student's row carries its own metrics and its paired
    difference to its backbone's single row, which is its plain head (the same run)."""
    runs, result = distilled
    table = json.loads(_cli(capsys, "ensemble", "--store", store.path, "--members", "a,b,c", "--strategies", "late",
                            "--combinations", "late:a+b", "--run", result.student.path, "--runs", runs, "--device",
                            "cpu", "--epochs", FAST["epochs"], "--batch-size", FAST["batch_size"], "--seeds", "0,1",
                            "--format", "json", "--quiet"))
    rows = {(r["strategy"], "+".join(r["members"])): r for r in table}
    row, plain = rows["distilled", "c"], rows["single", "c"]
    assert row["accuracy"] == pytest.approx(result.student.metrics["accuracy"])
    assert plain["accuracy"] == pytest.approx(result.plain.metrics["accuracy"])
    assert row["delta_accuracy_vs"] == "c"
    assert row["delta_accuracy"] == pytest.approx(row["accuracy"] - plain["accuracy"])
    assert ("late", "a+b") in rows


def test_a_run_of_another_store_is_refused_as_a_table_row(distilled, tmp_path, capsys):
    _, result = distilled
    other = write_feature_store(tmp_path / "other.zarr", per_class=30)
    assert main(["ensemble", "--store", str(other.path), "--members", "a", "--run", str(result.student.path),
                 "--runs", str(tmp_path / "runs"), "--quiet"]) == 2
    assert "another store" in capsys.readouterr().err


MEMBERS = ("timm:test_vit", "timm:test_resnet")


def test_a_student_predicts_new_images_alone_and_fused_with_another_run(manifest_csv, tmp_path):
    """`fgembed predict --run STUDENT` rebuilds the student's one backbone and gives its stored
    test top-1; `--run STUDENT --run OTHER` fuses them late as their stored logits fuse."""
    from fgembed.backbones import LoadOptions
    from fgembed.datasets import load_dataset
    from fgembed.extraction.extract import ExtractOptions, extract
    from fgembed.predict import predict
    from fgembed.store import FeatureStore

    table = load_dataset("manifest", manifest_csv)
    extract(table, tmp_path / "s.zarr", list(MEMBERS),
            ExtractOptions(load=LoadOptions(pretrained=False), workers=0, progress=False, device="cpu"))
    images = FeatureStore.open(tmp_path / "s.zarr")
    config = RunConfig(ViewConfig(features=(MEMBERS[0],)), HeadConfig(epochs=3, seeds=(0, 1), teacher=MEMBERS))
    result = distill(images, config, tmp_path / "runs", device="cpu")
    rows, logits = result.student.logits("test")
    files = [Path(table.root) / table.paths[r] for r in rows]
    work = tmp_path / "work"  # the second prediction reuses the student backbone's embeddings of the images
    alone = predict([result.student.path], files, top_k=1, device="cpu", workers=0, progress=False, work_dir=work)
    assert (alone.top_ids[:, 0] != logits.astype(np.float32).mean(0).argmax(1)).sum() <= 2  # float16 near-ties
    other = result.teachers[1]
    fused = predict([result.student.path, other.path], files, top_k=1, device="cpu", workers=0, progress=False,
                    work_dir=work)
    stored = np.mean([run.logits("test")[1].astype(np.float32).mean(0) for run in (result.student, other)], 0)
    assert (fused.top_ids[:, 0] != stored.argmax(1)).sum() <= 2
