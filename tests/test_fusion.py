"""Fusion math: PCA sum against scikit-learn fitted on train rows only, the learned projection,
late fusion averaging and validation-chosen weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from scipy.special import log_softmax, softmax
from sklearn.decomposition import PCA

from fgembed.classify.fusion import FUSIONS, SumProjection, concat, create_fusion
from fgembed.classify.late import fit_late_weights, late_fusion
from fgembed.classify.pca import PCASum, _components_on_device
from fgembed.classify.views import ViewConfig
from fgembed.errors import FgembedError

from .formats import write_feature_store


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three members' embeddings and the train / test rows every member embedded."""
    store = write_feature_store(tmp_path_factory.mktemp("fusion") / "f.zarr")
    feats = [store.features(name) for name in "abc"]
    usable = np.logical_and.reduce([np.isfinite(f).all(1) for f in feats])
    split = store.group["samples/split"][:]
    return feats, np.flatnonzero((split == 0) & usable), np.flatnonzero((split == 2) & usable)


def test_pca_sum_is_sklearn_pca_fitted_on_train_rows_only(members, tmp_path):
    feats, train, test = members
    feats = [np.nan_to_num(f) for f in feats]
    fused = PCASum().fit([f[train] for f in feats])
    assert fused.n_components_ == 16  # the smallest member dim by default
    expected = sum(PCA(16, random_state=0).fit(f[train]).transform(f) for f in feats)
    # float32 both ways, different solvers (covariance vs SVD): each within ~2e-4 of float64 on values up to ~40
    np.testing.assert_allclose(fused.transform(feats), expected, rtol=1e-4, atol=5e-4)
    # test rows never influence the projection: changing them leaves every projection as it was
    changed = [f.copy() for f in feats]
    for f in changed:
        f[test] += 100.0
    refit = PCASum().fit([f[train] for f in changed])
    np.testing.assert_allclose(refit.transform(feats), fused.transform(feats), rtol=1e-5, atol=1e-5)
    # train rows projected have zero mean in every component (PCA centres on the train mean)
    np.testing.assert_allclose(fused.transform([f[train] for f in feats]).mean(0), 0, atol=1e-3)
    # saved arrays (through a safetensors file, as runs keep them) rebuild the same projection
    save_file(fused.arrays(), str(tmp_path / "p.safetensors"))
    again = PCASum.from_arrays(load_file(str(tmp_path / "p.safetensors")))
    np.testing.assert_array_equal(again.transform(feats), fused.transform(feats))
    with pytest.raises(FgembedError, match="not a saved PCA"):
        PCASum.from_arrays({"x": np.zeros(3)})


def _known_pca(n: int, d: int, offset: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float32 rows, mean, components) where the answer is known exactly: rows = √(n−1)·Z·diag(s)·Qᵀ + μ,
    Z orthonormal columns orthogonal to the ones vector, so the mean is μ and the covariance is Q·diag(s²)·Qᵀ
    with s well separated; components are Q's columns, each oriented with its largest loading positive
    (scikit-learn's `svd_flip` convention)."""
    rng = np.random.default_rng(seed)
    r = min(n - 1, d)
    z = np.linalg.qr(np.column_stack([np.ones(n), rng.normal(size=(n, r))]))[0][:, 1:]  # ⟂ ones
    q = np.linalg.qr(rng.normal(size=(d, r)))[0]
    mean = offset * rng.normal(size=d)
    x = np.sqrt(n - 1) * z @ np.diag(np.geomspace(3.0, 0.1, r)) @ q.T + mean
    components = q.T * np.sign(q.T[np.arange(r), np.abs(q.T).argmax(1)])[:, None]
    return x.astype(np.float32), mean, components


@pytest.mark.parametrize("n, d, k", [(400, 48, 32), (40, 64, 30)])  # covariance_eigh; full (fewer rows than dims)
def test_pca_sum_finds_the_known_components_with_sklearns_orientation(n, d, k):
    x, mean, components = _known_pca(n, d, offset=100.0)  # a mean large against the spread
    fused = PCASum(n_components=k).fit([x])
    np.testing.assert_allclose(fused.means_[0], mean, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(fused.components_[0], components[:k], atol=2e-3)
    reference = PCA(k, svd_solver="full").fit(x.astype(np.float64))  # scikit-learn's exact PCA, float64
    np.testing.assert_allclose(fused.components_[0], reference.components_, atol=2e-3)
    np.testing.assert_allclose(fused.transform([x]), reference.transform(x.astype(np.float64)), atol=2e-3)
    np.testing.assert_array_equal(x, _known_pca(n, d, offset=100.0)[0])  # the rows were left unchanged
    x16 = x.astype(np.float16)  # a store's float16 rows are widened, not overwritten
    widened = x16.astype(np.float32)
    np.testing.assert_allclose(PCASum(n_components=k).fit([x16]).transform([widened]),
                               PCASum(n_components=k).fit([widened]).transform([widened]), atol=1e-4)
    np.testing.assert_array_equal(x16, x.astype(np.float16))


def test_pca_on_a_torch_device_equals_sklearn():
    """The GPU path (torch `eigh` of the float64 covariance), run here on the CPU device."""
    x, _, components = _known_pca(300, 40, offset=100.0, seed=1)
    got = _components_on_device(x, x.mean(0, dtype=np.float64), 24, "cpu")
    np.testing.assert_allclose(got, components[:24], atol=2e-3)
    np.testing.assert_allclose(got, PCA(24, svd_solver="full").fit(x.astype(np.float64)).components_, atol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pca_sum_on_cuda_equals_the_host_fit():
    x, _, _ = _known_pca(500, 64, offset=100.0, seed=2)
    host, gpu = PCASum(n_components=40).fit([x]), PCASum(n_components=40, device="cuda").fit([x])
    np.testing.assert_allclose(gpu.means_[0], host.means_[0], atol=1e-4)
    np.testing.assert_allclose(gpu.components_[0], host.components_[0], atol=2e-3)


def test_pca_sum_dimension_limits():
    few = [np.random.default_rng(0).normal(size=(5, 20)), np.random.default_rng(1).normal(size=(5, 30))]
    assert PCASum().fit(few).n_components_ == 5  # capped by the number of training rows
    with pytest.raises(FgembedError, match="exceeds"):
        PCASum(n_components=12).fit(few)


def test_sum_projection_is_the_sum_of_per_member_linears():
    torch.manual_seed(0)
    proj = SumProjection((3, 5), 4)
    x = torch.randn(7, 8)
    manual = proj.projections[0](x[:, :3]) + proj.projections[1](x[:, 3:])
    torch.testing.assert_close(proj(x), manual)


def test_concat_and_l2_and_the_fusion_registry():
    a, b = np.ones((2, 3)), np.full((2, 2), 3.0)
    assert concat([a, b]).shape == (2, 5)
    np.testing.assert_allclose(np.linalg.norm(concat([a, b], l2=True)[:, :3], axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(concat([a, b], l2=True)[:, 3:], axis=1), 1.0)
    assert {"concat", "single", "sum"} <= set(FUSIONS)
    learned = create_fusion(ViewConfig(features=("a", "b"), fusion="sum", project="linear"), [3, 2])
    np.testing.assert_array_equal(learned.apply([a, b]), concat([a, b]))  # learned: the head projects
    assert learned.head_params() == {"sum_blocks": (3, 2), "sum_dim": None} and not learned.stateful


def test_late_fusion_averages_logits_or_probabilities():
    rng = np.random.default_rng(0)
    z = [rng.normal(size=(10, 4)) for _ in range(3)]
    np.testing.assert_allclose(late_fusion(z), np.mean(z, 0), rtol=1e-5)
    w = np.array([0.5, 0.3, 0.2])
    np.testing.assert_allclose(late_fusion(z, weights=w), np.tensordot(w, np.stack(z), 1), rtol=1e-5)
    p = np.mean([softmax(x, 1) for x in z], 0)
    np.testing.assert_allclose(late_fusion(z, "proba"), np.log(p), rtol=1e-5)
    # log of an average of distributions is already normalised
    np.testing.assert_allclose(log_softmax(late_fusion(z, "proba"), 1), late_fusion(z, "proba"), atol=1e-5)
    with pytest.raises(FgembedError, match="same rows"):
        late_fusion([z[0], z[1][:5]])
    with pytest.raises(FgembedError, match="logits or proba"):
        late_fusion(z, "vote")


@pytest.mark.parametrize("mode", ["logits", "proba"])
def test_validation_weights_favour_the_informative_member(mode):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    good = 4 * np.eye(5)[y] + rng.normal(size=(400, 5))
    noise = 4 * rng.normal(size=(400, 5))
    w = fit_late_weights([noise, good], y, mode)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    assert w[1] > 0.8
