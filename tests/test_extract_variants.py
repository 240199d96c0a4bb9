"""Extraction variants (`~linear4`, `~l<i>`, `~mean`, `~flip`): names, the numbers against each
library's own modules (forward hooks on its blocks, its final norm), one forward per batch, equal
to separate runs, and groups that fit, fuse and predict like any backbone."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fgembed.cli.main import app
from PIL import Image
from typer.testing import CliRunner

from fgembed.backbones import LoadOptions, Variant, expand_names, load_backbone, split_name
from fgembed.datasets import load_dataset
from fgembed.devices import DeviceModel
from fgembed.errors import FgembedError
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.store import FeatureStore

ROWS = [0, 9, 33, 59]


@pytest.fixture(scope="module")
def table(manifest_csv):
    return load_dataset("manifest", manifest_csv)


def _opts(**kw) -> ExtractOptions:
    kw.setdefault("load", LoadOptions(pretrained=False))
    return ExtractOptions(batch_size=8, workers=0, shard_rows=16, progress=False, dtype="float32", device="cpu", **kw)


def _images(table, rows):
    return [Image.open(table.source.path(r)).convert("RGB") for r in rows]


def test_names_parse_in_one_order_and_flags_expand():
    assert split_name("dinov2_vitl14~448~linear4~flip") == ("dinov2_vitl14", 448, Variant("linear4", None, True))
    assert split_name("hf:~/models/x~l3~mean") == ("hf:~/models/x", None, Variant("l3", "mean"))
    assert split_name("timm:test_vit") == ("timm:test_vit", None, Variant())
    for bad, message in (("x~flip~448", "in the order ~size~layers~pooling~flip"), ("x~big", "unknown variant ~big"),
                         ("x~linear4~mean", "has its own pooling"), ("x~l2~cls", "CLS token by default"),
                         ("x~pooled", "default output"), ("x~mean~mean", "each once")):
        with pytest.raises(FgembedError, match=message):
            split_name(bad)
    assert expand_names(["d"], ["final", "linear4", "20"], ["cls", "mean"], ["none", "flip"]) == [
        "d~cls", "d~cls~flip", "d~mean", "d~mean~flip", "d~linear4", "d~linear4~flip", "d~l20", "d~l20~flip",
        "d~l20~mean", "d~l20~mean~flip"]
    assert expand_names(["d~448"], ["linear4"]) == ["d~448~linear4"]
    assert expand_names(["a", "b~mean"], tta=["flip"]) == ["a~flip", "b~mean~flip"]
    with pytest.raises(FgembedError, match="--pooling has no effect"):
        expand_names(["d"], ["linear4"], ["mean"])
    with pytest.raises(FgembedError, match="names its own layers"):
        expand_names(["d~linear4"], ["20"])
    with pytest.raises(FgembedError, match="blocks count from 0"):
        expand_names(["d"], ["-1"])


def _hooked_tokens(name: str, model, x: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Every block's output through the library's final norm, read with forward hooks on the
    library's own block modules (no `forward_intermediates`, no `output_hidden_states`), and the
    number of prefix tokens."""
    if name.startswith("timm"):
        blocks, norm, prefix = model.blocks, model.norm, model.num_prefix_tokens
    elif name.startswith("open_clip"):
        blocks, norm, prefix = model.visual.transformer.resblocks, model.visual.ln_post, 1
    else:
        inner = model.encoder.layer if hasattr(model, "encoder") else model.model.layer
        blocks = inner
        norm = getattr(model, "layernorm", None) or model.norm
        prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    seen: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
               for b in blocks]
    with torch.no_grad():
        if name.startswith("open_clip"):
            model.encode_image(x)
        elif name.startswith("timm"):
            model.forward_features(x)
        else:
            model(pixel_values=x)
    for h in handles:
        h.remove()
    return [norm(t) for t in seen], prefix


@pytest.mark.parametrize("which", ["open_clip", "dinov2", "dinov3"])
def test_linear4_and_blocks_are_the_library_modules_outputs(table, tmp_path, tiny_clip, hf_models, which):
    """[CLS of the last four blocks after the final norm, mean of the last block's patch tokens],
    and a block's mean-pooled patch tokens, equal what hooks on the library's blocks give."""
    name = {"timm": "timm:test_vit3", "open_clip": f"open_clip:local-dir:{tiny_clip['local_dir']}",
            "dinov2": f"hf:{hf_models['dinov2']}", "dinov3": f"hf:{hf_models['dinov3']}"}[which]
    reference = load_backbone(name, LoadOptions(pretrained=False))
    assert reference.n_blocks == 2  # the tiny models: linear4 needs four blocks, and says so
    with pytest.raises(FgembedError, match=r"has 2 blocks \(0–1\)"):
        extract(table, tmp_path / "s.zarr", [f"{name}~linear4"], _opts())
    extract(table, tmp_path / "b.zarr", [f"{name}~l0~mean", f"{name}~cls+mean"], _opts())
    store = FeatureStore.open(tmp_path / "b.zarr")
    x = torch.stack([reference.transform(im) for im in _images(table, ROWS)])
    tokens, prefix = _hooked_tokens(name, reference.model, x)
    want_l0 = tokens[0][:, prefix:].mean(1)
    want_final = torch.cat([tokens[-1][:, 0], tokens[-1][:, prefix:].mean(1)], dim=1)
    np.testing.assert_allclose(store.features(f"{name}~l0~mean")[ROWS], want_l0.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(store.features(f"{name}~cls+mean")[ROWS], want_final.numpy(), rtol=1e-4, atol=1e-5)


def test_linear4_on_a_deeper_vit(table, tmp_path):
    """timm's test_vit has six blocks: linear4 reads blocks 2–5."""
    name = "timm:test_vit"
    extract(table, tmp_path / "s.zarr", [f"{name}~linear4"], _opts())
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.backbone_info(f"{name}~linear4").fingerprint["layers"] == [2, 3, 4, 5]
    reference = load_backbone(name, LoadOptions(pretrained=False))
    x = torch.stack([reference.transform(im) for im in _images(table, ROWS)])
    tokens, prefix = _hooked_tokens(name, reference.model, x)
    want = torch.cat([t[:, 0] for t in tokens[2:6]] + [tokens[5][:, prefix:].mean(1)], dim=1)
    assert want.shape[1] == 5 * 64
    np.testing.assert_allclose(store.features(f"{name}~linear4")[ROWS], want.numpy(), rtol=1e-4, atol=1e-5)


def test_flip_is_the_mean_with_the_mirrored_input(table, tmp_path):
    name = "timm:test_resnet"
    extract(table, tmp_path / "s.zarr", [f"{name}~flip"], _opts())
    got = FeatureStore.open(tmp_path / "s.zarr").features(f"{name}~flip")
    model = load_backbone(name, LoadOptions(pretrained=False)).model
    b = load_backbone(name, LoadOptions(pretrained=False))
    x = torch.stack([b.transform(im) for im in _images(table, ROWS)])
    with torch.no_grad():
        own = lambda t: model.forward_head(model.forward_features(t), pre_logits=True)  # noqa: E731
        want = (own(x) + own(torch.flip(x, dims=[3]))) / 2
    np.testing.assert_allclose(got[ROWS], want.numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(got[ROWS], own(x).numpy(), atol=1e-4)  # the mirror really entered
    fp = FeatureStore.open(tmp_path / "s.zarr").backbone_info(f"{name}~flip").fingerprint
    assert fp["tta"].startswith("flip") and fp["pooling"] == "pooled"


def test_one_forward_per_batch_equals_separate_runs(table, tmp_path, monkeypatch):
    """Four groups of one model from one forward per batch, each bit-equal to a run of its own;
    flip groups (a doubled batch) likewise among themselves."""
    forwards = []
    real = DeviceModel.forward
    monkeypatch.setattr(DeviceModel, "forward", lambda self, x: forwards.append(len(x)) or real(self, x))
    plain = ["timm:test_vit", "timm:test_vit~linear4", "timm:test_vit~l1~mean", "timm:test_vit~cls+mean"]
    flipped = ["timm:test_vit~flip", "timm:test_vit~l1~mean~flip"]
    summary = extract(table, tmp_path / "all.zarr", plain, _opts())
    assert len(forwards) == 8 and summary.processed == 60  # shards of 16 rows in batches of 8: 8 batches
    assert summary.backbones == {"timm:test_vit": 64, "timm:test_vit~linear4": 320, "timm:test_vit~l1~mean": 64,
                                 "timm:test_vit~cls+mean": 128}
    extract(table, tmp_path / "all.zarr", flipped, _opts())
    together = FeatureStore.open(tmp_path / "all.zarr")
    for i, name in enumerate(plain + flipped):
        extract(table, tmp_path / f"{i}.zarr", [name], _opts())
        np.testing.assert_array_equal(together.features(name), FeatureStore.open(tmp_path / f"{i}.zarr").features(name),
                                      err_msg=name)


def test_layers_need_a_vit_and_a_real_block(table, tmp_path):
    with pytest.raises(FgembedError, match="give its pooling in the name"):
        extract(table, tmp_path / "p.zarr", ["timm:test_vit~flip"], _opts(load=LoadOptions(pretrained=False,
                                                                                            pooling="mean")))
    with pytest.raises(FgembedError, match="gives no token outputs"):
        extract(table, tmp_path / "a.zarr", ["timm:test_resnet~linear4"], _opts())
    with pytest.raises(FgembedError, match=r"has 6 blocks \(0–5\); ~l9"):
        extract(table, tmp_path / "b.zarr", ["timm:test_vit~l9"], _opts())
    with pytest.raises(FgembedError, match="no CLS token"):
        extract(table, tmp_path / "c.zarr", ["timm:test_vit2~cls"], _opts())
    summary = extract(table, tmp_path / "d.zarr", ["timm:test_vit2~mean"], _opts())  # registers are skipped
    assert summary.backbones == {"timm:test_vit2~mean": 64}


def test_cli_expands_flags_into_groups(manifest_csv, tmp_path):
    args = ["extract", "--dataset", "manifest", "--root", str(manifest_csv), "--store", str(tmp_path / "s.zarr"),
            "--backbone", "timm:test_vit", "--no-pretrained", "--workers", "0", "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(app, [*args, "--layers", "final,linear4", "--pooling", "pooled,mean",
                                      "--tta", "none,flip", "--json"])
    assert result.exit_code == 0, result.output
    groups = json.loads(result.stdout)["backbones"]
    assert list(groups) == ["timm:test_vit", "timm:test_vit~flip", "timm:test_vit~mean", "timm:test_vit~mean~flip",
                            "timm:test_vit~linear4", "timm:test_vit~linear4~flip"]
    result = CliRunner().invoke(app, [*args, "--layers", "linear4", "--pooling", "mean"])
    assert isinstance(result.exception, FgembedError) and "--pooling has no effect" in str(result.exception)


def test_variant_groups_fit_fuse_and_predict(table, tmp_path):
    """A variant is a member like any other: a run on `~linear4~flip` predicts new images through
    a rebuild of exactly that variant, and two variants fuse."""
    from fgembed.classify.config import HeadConfig, RunConfig
    from fgembed.classify.fitting import fit_run
    from fgembed.classify.views import ViewConfig
    from fgembed.predict import predict

    names = ["timm:test_vit~linear4~flip", "timm:test_vit~mean"]
    extract(table, tmp_path / "s.zarr", names, _opts())
    store = FeatureStore.open(tmp_path / "s.zarr")
    run = fit_run(store, RunConfig(ViewConfig(features=(names[0],)), HeadConfig(epochs=3)), tmp_path / "runs",
                  device="cpu")
    fused = fit_run(store, RunConfig(ViewConfig(features=tuple(names), fusion="concat"), HeadConfig(epochs=1)),
                    tmp_path / "runs", device="cpu")
    assert fused.metrics["input_dim"] == 320 + 64
    rows, logits = run.logits("test")
    files = [Path(table.root) / table.paths[r] for r in rows]
    predictions = predict([run.path], files, top_k=1, device="cpu", workers=0, progress=False)
    stored = np.asarray(logits, np.float32).mean(0).argmax(1)
    assert (predictions.top_ids[:, 0] != stored).sum() <= 2
