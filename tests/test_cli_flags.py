"""Flags that cannot do anything with the others given: one line and exit 2 (or one warning line
when the combination is harmless), before any store is read or bar drawn."""
from __future__ import annotations

import pytest
from fgembed.cli.main import main

from fgembed.classify.options import ensemble_config, run_config
from fgembed.errors import FgembedError

from .formats import write_feature_store
from .test_usage_errors import _one_error_line


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_feature_store(tmp_path_factory.mktemp("flags") / "f.zarr")


FIT = [  # (arguments after `fit --store S`, what the one line names)
    (["--features", "a+b", "--fusion", "concat", "--project-dim", "16"], "--project-dim"),
    (["--features", "a+b", "--fusion", "concat", "--project", "linear"], "--project"),
    (["--features", "a+b", "--project-dim", "16"], "--fusion concat"),  # concat is the default fusion
    (["--features", "a", "--fusion", "sum"], "--fusion joins several features"),
    (["--features", "a", "--l2"], "--l2"),
    (["--features", "a", "--hierarchy", "independent"], "give --levels"),
    (["--features", "a", "--level-weights", "1,2"], "give --levels"),
    (["--features", "a", "--head", "knn", "--lr", "1e-3,1e-2"], "--lr"),
    (["--features", "a", "--head", "knn", "--epochs", "5"], "--epochs"),
    (["--features", "a", "--head", "logreg", "--batch-size", "64", "--weight-decay", "0"], "--weight-decay"),
    (["--features", "a", "--holdout-level", "group"], "give --holdout"),
    (["--features", "a", "--holdout-seed", "3"], "give --holdout"),
    (["--features", "a", "--draw", "2"], "give --shots"),
    (["--features", "a", "--draws", "3"], "give --shots"),
    (["--features", "a", "--level", "genus"], "no taxonomy level 'genus'"),
    (["--features", "a", "--levels", "genus,label"], "no taxonomy level 'genus'"),
    (["--features", "a", "--head", "knm"], "did you mean knn"),
]

ENSEMBLE = [
    (["--members", "a,b", "--strategies", "late", "--project-dim", "8"], "no sum"),
    (["--members", "a,b", "--strategies", "late,concat", "--project", "linear"], "no sum"),
    (["--members", "a,b", "--strategies", "late", "--l2"], "has none"),
    (["--members", "a,b", "--strategies", "concat", "--late-weights", "val"], "no row of this table is late"),
    (["--members", "a,b", "--combinations", "singles", "--late-mode", "proba"], "no row of this table is late"),
    (["--members", "a,b", "--head", "knn", "--epochs", "3"], "--epochs"),
    (["--members", "a,zz"], "no features 'zz'"),
    (["--members", "a,b", "--level", "genus"], "no taxonomy level 'genus'"),
]


@pytest.mark.parametrize("args, named", FIT, ids=[" ".join(a) for a, _ in FIT])
def test_fit_refuses_a_flag_that_cannot_matter(capsys, store, tmp_path, args, named):
    line = _one_error_line(capsys, ["fit", "--store", str(store.path), "--runs", str(tmp_path), *args])
    assert named in line
    assert not any(tmp_path.iterdir())  # nothing was trained or written


@pytest.mark.parametrize("args, named", ENSEMBLE, ids=[" ".join(a) for a, _ in ENSEMBLE])
def test_ensemble_refuses_a_flag_that_cannot_matter(capsys, store, tmp_path, args, named):
    line = _one_error_line(capsys, ["ensemble", "--store", str(store.path), "--runs", str(tmp_path), *args])
    assert named in line  # and it is the only line: no "ensemble: N rows" before the refusal


def test_a_typed_default_is_a_choice_and_an_untyped_one_is_not():
    """Only what the user gave is checked: --lr typed at its default still means "train"; the
    default projection of a concat run is nobody's choice."""
    with pytest.raises(FgembedError, match="--lr"):
        run_config(("a",), head="knn", lr=(1e-3,))
    assert run_config(("a",), head="knn").head.head == "knn"
    assert run_config(("a", "b")).view.fusion == "concat"
    summed = run_config(("a", "b"), fusion="sum", project="linear", project_dim=8, l2=True)
    assert (summed.view.project, summed.view.project_dim, summed.view.l2) == ("linear", 8, True)
    base = ensemble_config(["a", "b"], ["late", "sum"], project_dim=8, epochs=3)
    assert base.view.project_dim == 8 and base.head.epochs == 3
    with pytest.raises(TypeError):
        run_config(("a",), epochz=3)  # a misspelt keyword in Python is a programming error, not a flag


def test_shots_beyond_the_rows_of_a_class_warn_in_one_line(capsys, store, tmp_path):
    assert main(["fit", "--store", str(store.path), "--runs", str(tmp_path), "--features", "a", "--shots", "100",
                 "--epochs", "2", "--quiet", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "--shots 100" in warnings[0] and "train on all they have" in warnings[0]


def test_ctrl_c_resume_line_drops_force(capsys, store, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fgembed.classify.fitting.fit_run", interrupted)
    argv = ["fit", "--store", str(store.path), "--runs", str(tmp_path), "--features", "a", "--force", "--quiet"]
    assert main(argv) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("interrupted: finished work is saved; resume with: fgembed fit --store")
    assert " --force" not in line.split("(")[0] and "without --force" in line
