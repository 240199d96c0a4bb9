"""Each adapter, through the whole extraction pipeline, equals its source library's own path."""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import timm
import timm.data
import torch
from PIL import Image

from fgembed.backbones import REFERENCE, LoadOptions, load_backbone, resolve
from fgembed.datasets import load_dataset
from fgembed.errors import FgembedError
from fgembed.extract import ExtractOptions, extract
from fgembed.store import FeatureStore


@pytest.fixture(scope="module")
def table(manifest_csv):
    return load_dataset("manifest", manifest_csv)


def _extract(table, tmp_path, name, **load):
    options = ExtractOptions(batch_size=7, workers=0, dtype="float32", shard_rows=16, progress=False,
                             load=LoadOptions(**load))
    extract(table, tmp_path / "s.zarr", [name], options)
    return FeatureStore.open(tmp_path / "s.zarr").features(name)


def _images(table, rows):
    return [Image.open(table.absolute_path(r)).convert("RGB") for r in rows]


ROWS = [0, 9, 33, 59]


@pytest.mark.parametrize("model_name", ["test_vit", "test_convnext", "test_resnet"])
def test_timm_equals_forward_head_pre_logits(table, tmp_path, model_name):
    torch.manual_seed(3)
    reference = timm.create_model(model_name).eval()
    ckpt = tmp_path / "w.pth"
    torch.save(reference.state_dict(), ckpt)
    got = _extract(table, tmp_path, f"timm:{model_name}", weights=ckpt)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(reference), is_training=False)
    with torch.no_grad():
        x = torch.stack([transform(im) for im in _images(table, ROWS)])
        want = reference.forward_head(reference.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(got[ROWS], want, rtol=1e-4, atol=1e-5)


def test_open_clip_equals_encode_image(table, tmp_path, tiny_clip):
    got = _extract(table, tmp_path, f"open_clip:{tiny_clip['name']}", weights=tiny_clip["weights"])
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_clip["name"], pretrained=str(tiny_clip["weights"]))
    with torch.no_grad():
        want = model.eval().encode_image(torch.stack([preprocess(im) for im in _images(table, ROWS)])).numpy()
    np.testing.assert_allclose(got[ROWS], want, rtol=1e-4, atol=1e-5)


def test_open_clip_local_dir_package(table, tmp_path, tiny_clip):
    """open_clip's own `local-dir:` packaging (config + preprocess + weights in one folder)."""
    name = f"open_clip:local-dir:{tiny_clip['local_dir']}"
    got = _extract(table, tmp_path, name)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip['local_dir']}")
    assert "Resize(size=(64, 64)" in repr(preprocess)  # the folder's squash resize, not CLIP's default
    with torch.no_grad():
        want = model.eval().encode_image(torch.stack([preprocess(im) for im in _images(table, ROWS)])).numpy()
    np.testing.assert_allclose(got[ROWS], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which", ["dinov2", "dinov3"])
def test_hf_equals_pooled_output_after_processor(table, tmp_path, hf_models, which):
    from transformers import AutoImageProcessor, AutoModel

    folder = hf_models[which]
    got = _extract(table, tmp_path, f"hf:{folder}")
    processor, model = AutoImageProcessor.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(**processor(images=_images(table, ROWS), return_tensors="pt"))
    np.testing.assert_allclose(got[ROWS], out.pooler_output.numpy(), rtol=1e-4, atol=1e-5)
    if which == "dinov3":  # mean pooling skips CLS and the 4 register tokens
        tokens = out.last_hidden_state
        mean = _extract(table, tmp_path / "m", f"hf:{folder}", pooling="mean")
        np.testing.assert_allclose(mean[ROWS], tokens[:, 5:].mean(1).numpy(), rtol=1e-4, atol=1e-5)
        both = _extract(table, tmp_path / "b", f"hf:{folder}", pooling="cls+mean")
        assert both.shape[1] == 64
        np.testing.assert_allclose(both[ROWS, :32], tokens[:, 0].numpy(), rtol=1e-4, atol=1e-5)


def test_timm_vit_token_pooling_and_image_size(table, tmp_path):
    bb = load_backbone("timm:test_vit", LoadOptions(pretrained=False, pooling="mean", image_size=96))
    assert bb.input_shape == (3, 96, 96)
    x = bb.transform(_images(table, [0])[0]).unsqueeze(0)
    with torch.no_grad():
        tokens = bb.model.forward_features(x)
        np.testing.assert_allclose(bb.embed(x).numpy(), tokens[:, bb.model.num_prefix_tokens:].mean(1).numpy())
    with pytest.raises(FgembedError, match="needs a token model"):
        load_backbone("timm:test_resnet", LoadOptions(pretrained=False, pooling="cls"))


def test_random_init_is_seeded_and_announced():
    a = load_backbone("timm:test_vit", LoadOptions(pretrained=False))
    b = load_backbone("timm:test_vit", LoadOptions(pretrained=False))
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert a.fingerprint["weights"].startswith("random-init")


def test_reference_specs_match_library_metadata():
    """The README's documented preprocessing equals what timm / open_clip say offline."""
    spec = REFERENCE["convnextv2_large"]
    cfg = timm.models.get_pretrained_cfg(spec.model)
    assert cfg.input_size[-1] == spec.input_size and cfg.interpolation == spec.interpolation
    assert tuple(cfg.mean) == spec.mean and tuple(cfg.std) == spec.std
    for name in ("openclip_vitl14", "siglip_vitl16_256"):
        spec = REFERENCE[name]
        oc = open_clip.get_pretrained_cfg(spec.model, spec.weights)
        assert tuple(oc["mean"]) == spec.mean and tuple(oc["std"]) == spec.std
        assert oc["interpolation"] == spec.interpolation
        assert open_clip.get_model_config(spec.model)["vision_cfg"]["image_size"] == spec.input_size
        assert open_clip.get_model_config(spec.model)["embed_dim"] == spec.dim


def test_unknown_names_list_close_ones():
    with pytest.raises(FgembedError, match="did you mean dinov2_vitl14"):
        resolve("dinov2_vitl")
    with pytest.raises(FgembedError, match="unknown timm model"):
        load_backbone("timm:resnet_does_not_exist", LoadOptions(pretrained=False))
    with pytest.raises(FgembedError, match="unknown open_clip model"):
        load_backbone("open_clip:ViT-L-15/openai", LoadOptions(pretrained=False))
    with pytest.raises(FgembedError, match="no weights 'nope'"):
        load_backbone("open_clip:ViT-B-32/nope")
