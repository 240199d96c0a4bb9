"""A feature store with known class structure, written through the store's own API."""
from __future__ import annotations


def write_feature_store(path, n_classes: int = 6, per_class: int = 40, dims=(24, 16, 32), seed: int = 0,
                        failed_test_rows: int = 1, names=("a", "b", "c")):
    """A store with class-structured features for three members (`a`, `b`, `c`) written through
    the store's own API, as extraction writes them. Each member sees the classes through its own
    random projection plus noise, so the members are informative and partly complementary.
    The first `failed_test_rows` test rows failed in the third member (NaN, status unreadable)."""
    import numpy as np

    from fgembed.datasets.table import Level, SampleTable
    from fgembed.images import UNREADABLE
    from fgembed.store import FeatureStore

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    n = len(labels)
    split = np.tile(np.array([0, 0, 0, 1, 2, 2, 0, 0, 1, 2], np.uint8), -(-n // 10))[:n]
    paths = [f"c{y}/img{i}.jpg" for i, y in enumerate(labels)]
    table = SampleTable("synthetic", "/nowhere", np.arange(1, n + 1), paths,
                        labels, [f"class {c}" for c in range(n_classes)], split,
                        {"group": Level((labels // 2).astype(np.int32), [f"group {g}" for g in range(n_classes // 2)])})
    store = FeatureStore.create(path, table, shard_rows=64)
    latent = np.eye(n_classes)[labels] * 2.0 + rng.normal(size=(n, n_classes))
    for i, (name, d) in enumerate(zip(names, dims)):
        emb = latent @ rng.normal(size=(n_classes, d)) + rng.normal(scale=1.5, size=(n, d))
        status = np.zeros(n, np.uint8)
        if i == 2:
            status[np.flatnonzero(split == 2)[:failed_test_rows]] = UNREADABLE
        store.prepare(name, {"source": "test", "member": name}, d, dtype="float32")
        for shard in range(store.n_shards):
            rows = store.shard_slice(shard)
            store.write_shard(name, shard, emb[rows], status[rows])
        store.mark_complete(name, None)
    return store
