"""Each adapter, through the whole extraction pipeline, equals its source library's own path."""
from __future__ import annotations

import shutil

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
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.store import FeatureStore


@pytest.fixture(scope="module")
def table(manifest_csv):
    return load_dataset("manifest", manifest_csv)


def _extract(table, tmp_path, name, **load):
    options = ExtractOptions(batch_size=7, workers=0, dtype="float32", shard_rows=16, progress=False,
                             device="cpu", load=LoadOptions(**load))  # compared with the fp32 CPU forward
    extract(table, tmp_path / "s.zarr", [name], options)
    return FeatureStore.open(tmp_path / "s.zarr").features(name)


def _images(table, rows):
    return [Image.open(table.source.path(r)).convert("RGB") for r in rows]


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
    # the folder's weights are hashed into the fingerprint: other weights, another identity
    weights = load_backbone(name).fingerprint["weights"]
    assert "sha256" in weights
    changed = tmp_path / "changed"
    shutil.copytree(tiny_clip["local_dir"], changed)
    state = torch.load(changed / "open_clip_pytorch_model.bin")
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, changed / "open_clip_pytorch_model.bin")
    assert load_backbone(f"open_clip:local-dir:{changed}").fingerprint["weights"] != weights


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


# --- the uint8 split: `(geometric(img)/255 - mean)/std` is the library's own transform ----------

def _split_error(bb, image) -> float:
    got = (bb.geometric(image).float() / 255 - torch.tensor(bb.mean).view(-1, 1, 1)) / torch.tensor(bb.std).view(-1, 1, 1)
    return float((got - bb.transform(image)).abs().max())


@pytest.mark.parametrize("name", ["timm:test_vit", "timm:test_convnext"])
def test_timm_split_reproduces_the_transform(table, name):
    bb = load_backbone(name, LoadOptions(pretrained=False))
    assert bb.geometric is not None and bb.mean in ((0.5, 0.5, 0.5), timm.data.IMAGENET_DEFAULT_MEAN)
    for image in _images(table, ROWS):
        assert bb.geometric(image).dtype == torch.uint8
        assert _split_error(bb, image) < 1e-5  # PIL resizes uint8 to uint8: the split is exact


def test_open_clip_split_reproduces_the_transform(table, tiny_clip):
    for name in (f"open_clip:{tiny_clip['name']}", f"open_clip:local-dir:{tiny_clip['local_dir']}"):
        bb = load_backbone(name, LoadOptions(pretrained=False))
        assert bb.geometric is not None
        assert all(_split_error(bb, image) < 1e-5 for image in _images(table, ROWS))
    assert bb.mean == (0.5, 0.5, 0.5)  # the package's own preprocess config, not CLIP's default


def test_hf_split_exact_for_dinov2_refused_for_dinov3(table, hf_models):
    """DINOv2's processor resizes the uint8 image: exact split. DINOv3's rescales to float first,
    then resizes: a uint8 feed would move pixels by up to one level, so it keeps the float feed."""
    from fgembed.backbones.base import uint8_split_error
    from fgembed.backbones.from_hf import _split

    v2 = load_backbone(f"hf:{hf_models['dinov2']}", LoadOptions(pretrained=False))
    assert v2.geometric is not None and v2.mean == (0.485, 0.456, 0.406)
    assert all(_split_error(v2, image) < 1e-5 for image in _images(table, ROWS))
    v3 = load_backbone(f"hf:{hf_models['dinov3']}", LoadOptions(pretrained=False))
    assert v3.geometric is None and v3.mean == ()
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(hf_models["dinov3"])
    # the split the processor would offer, in uint8 levels: rounding, not a bug
    errors = [uint8_split_error(v3.transform, *_split(processor), image) for image in _images(table, ROWS)]
    assert 0.05 < max(errors) <= 1.0


# --- resolution: `name~size` ------------------------------------------------------------------

def test_size_suffix_names_a_backbone_of_its_own(table, tmp_path):
    from fgembed.backbones import split_size

    assert split_size("dinov2_vitl14~448") == ("dinov2_vitl14", 448)
    assert split_size("hf:~/models/dinov2") == ("hf:~/models/dinov2", None)  # a home path, not a size
    assert resolve("dinov2_vitl14~448").input_size == 448 and resolve("dinov2_vitl14~448").model == "facebook/dinov2-large"
    with pytest.raises(FgembedError, match="image size in pixels"):
        resolve("timm:test_vit~big")
    with pytest.raises(FgembedError, match="names 64 px but --image-size is 96"):
        load_backbone("timm:test_vit~64", LoadOptions(pretrained=False, image_size=96))
    assert load_backbone("timm:test_vit", LoadOptions(pretrained=False, image_size=96)).name == "timm:test_vit~96"
    assert load_backbone("timm:test_vit", LoadOptions(pretrained=False, image_size=160)).name == "timm:test_vit"


def test_two_sizes_of_one_backbone_in_one_store(table, tmp_path):
    options = ExtractOptions(batch_size=30, workers=0, dtype="float32", shard_rows=16, progress=False,
                             device="cpu", load=LoadOptions(pretrained=False))
    summary = extract(table, tmp_path / "s.zarr", ["timm:test_vit~64", "timm:test_vit"], options)
    assert summary.backbones == {"timm:test_vit~64": 64, "timm:test_vit": 64}
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert set(store.backbones()) == {"timm:test_vit~64", "timm:test_vit"}
    assert store.backbone_info("timm:test_vit~64").fingerprint["input_shape"] == [3, 64, 64]
    small, full = store.features("timm:test_vit~64"), store.features("timm:test_vit")
    bb = load_backbone("timm:test_vit~64", LoadOptions(pretrained=False))
    assert bb.name == "timm:test_vit~64" and bb.input_shape == (3, 64, 64)
    with torch.no_grad():
        want = bb.embed(torch.stack([bb.transform(im) for im in _images(table, ROWS)])).numpy()
    np.testing.assert_allclose(small[ROWS], want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(small, full, atol=1e-3)
    # the two sizes fuse like any two members (Cui et al.'s resolution study)
    from fgembed.classify.config import HeadConfig, RunConfig
    from fgembed.classify.fitting import fit_run
    from fgembed.classify.views import ViewConfig

    run = fit_run(store, RunConfig(ViewConfig(features=("timm:test_vit", "timm:test_vit~64"), fusion="concat"),
                                   HeadConfig(epochs=1)), tmp_path / "runs", device="cpu")
    assert run.metrics["input_dim"] == 128


# --- the reference architectures offline ------------------------------------------------------

@pytest.mark.parametrize("name, timm_name", [("dinov2_vitl14", "vit_large_patch14_dinov2.lvd142m"),
                                             ("dinov3_vitl16", "vit_large_patch16_dinov3.lvd1689m")])
def test_reference_hf_architectures_are_known_offline(name, timm_name):
    """The offline config has the sizes of the named checkpoint, checked against timm's own offline
    definition of the same network (built on the meta device: no memory, no weights)."""
    from transformers import AutoModel

    from fgembed.backbones.from_hf import OFFLINE

    spec = REFERENCE[name]
    config, processor = (make() for make in OFFLINE[spec.model])
    with torch.device("meta"):
        hf = AutoModel.from_config(config)
        ref = timm.create_model(timm_name, num_classes=0)
    assert (config.hidden_size, config.num_hidden_layers) == (ref.embed_dim, len(ref.blocks))
    assert config.num_attention_heads == ref.blocks[0].attn.num_heads
    assert hf.config.patch_size == ref.patch_embed.patch_size[0]
    assert 1 + getattr(config, "num_register_tokens", 0) == ref.num_prefix_tokens
    assert config.layer_norm_eps == ref.norm.eps
    mlp = getattr(config, "intermediate_size", None) or config.hidden_size * config.mlp_ratio
    assert mlp == ref.blocks[0].mlp.fc1.out_features
    assert sum(p.numel() for p in hf.parameters()) > 3e8  # a ViT-L
    # preprocessing: the README's row
    from PIL import Image as PILImage
    out = processor(images=PILImage.new("RGB", (300, 200)), return_tensors="pt")["pixel_values"]
    assert out.shape[-1] == spec.input_size
    assert tuple(processor.image_mean) == spec.mean and tuple(processor.image_std) == spec.std
    assert processor.resample.name.lower() == spec.interpolation


@pytest.mark.slow
def test_dinov3_builds_with_no_network(monkeypatch):
    """A ViT-L built from transformers' own classes, never touching the hub (offline mode on)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    bb = load_backbone("dinov3_vitl16", LoadOptions(pretrained=False))
    assert bb.dim == REFERENCE["dinov3_vitl16"].dim and bb.input_shape == (3, 224, 224)
    assert bb.fingerprint["weights"] == "random-init:seed0"
    assert sum(p.numel() for p in bb.model.parameters()) > 3e8


def test_pretrained_request_without_network_is_one_line(monkeypatch, tmp_path, manifest_csv, capsys):
    from fgembed.cli.main import main
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # restored afterwards: `--offline` sets it for the process
    for name in ("dinov2_vitl14", "convnextv2_large", "siglip_vitl16_256"):
        with pytest.raises(FgembedError) as err:
            load_backbone(name, LoadOptions(cache_dir=tmp_path / "empty"))
        message = str(err.value)
        assert "\n" not in message and f"fgembed download --backbone {name} --cache-dir DIR" in message
        assert "--cache-dir DIR --offline" in message
    capsys.readouterr()
    code = main(["extract", "--dataset", "manifest", "--root", str(manifest_csv), "--store", str(tmp_path / "s.zarr"),
                 "--backbone", "dinov3_vitl16", "--offline", "--cache-dir", str(tmp_path / "empty"), "--quiet"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(lines) == 1
    assert "fgembed download --backbone dinov3_vitl16 --cache-dir DIR" in lines[0]


def test_download_asks_each_library_for_its_cache(monkeypatch, tmp_path):
    """Up to the call into the library: names and the cache dir, nothing fetched."""
    import huggingface_hub
    import open_clip as oc

    from fgembed.backbones import download_weights

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, cache_dir: calls.append((repo, cache_dir)) or "hf")
    monkeypatch.setattr(oc, "download_pretrained", lambda cfg, cache_dir: calls.append((cfg["hf_hub"], cache_dir)) or "oc")
    monkeypatch.setattr(oc, "get_tokenizer", lambda arch, cache_dir: calls.append((arch, cache_dir)))
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: calls.append((name, kw)) or timm.models.create_model(
        "test_vit", num_classes=0))
    for name in ("dinov2_vitl14", "siglip_vitl16_256", "convnextv2_large"):
        download_weights(name, tmp_path)
    cache = str(tmp_path)
    assert calls[0] == ("facebook/dinov2-large", cache)
    assert calls[1] == (oc.get_pretrained_cfg("ViT-L-16-SigLIP-256", "webli")["hf_hub"], cache)
    assert calls[2] == ("ViT-L-16-SigLIP-256", cache)
    assert calls[3] == ("convnextv2_large.fcmae_ft_in22k_in1k", {"pretrained": True, "num_classes": 0, "cache_dir": cache})


def test_download_without_network_is_one_fgembed_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from fgembed.backbones import download_weights

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FgembedError) as err:
        download_weights("dinov2_vitl14", tmp_path)
    assert "\n" not in str(err.value) and str(err.value)


# --- placement: each model on its device, in its dtype, before the next is built ---------------------

def _placement_cases(tmp_path, tiny_clip, hf_models) -> list[tuple[str, LoadOptions]]:
    """One model of each library and loading path: a timm checkpoint file, timm random init (a
    channels-last convnet), open_clip's `local-dir:` package, transformers folders."""
    torch.manual_seed(5)
    ckpt = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), ckpt)
    return [("timm:test_vit", LoadOptions(weights=ckpt)), ("timm:test_resnet", LoadOptions(pretrained=False)),
            (f"open_clip:local-dir:{tiny_clip['local_dir']}", LoadOptions()),
            (f"hf:{hf_models['dinov2']}", LoadOptions()), (f"hf:{hf_models['dinov3']}", LoadOptions())]


def test_placed_load_equals_the_old_path_bit_for_bit(table, tmp_path, tiny_clip, hf_models):
    """Loading onto the device in bf16 gives the very numbers of loading in fp32 on the host and
    casting in `DeviceModel` (the old path), and of the library's own model cast to bf16."""
    from fgembed.devices import DeviceModel, resolve_precision

    cpu = torch.device("cpu")
    bf16 = resolve_precision("bf16", cpu)
    image = _images(table, [9])[0]
    for name, options in _placement_cases(tmp_path, tiny_clip, hf_models):
        old = DeviceModel(load_backbone(name, options), cpu, bf16, compile_model=False)
        new = DeviceModel(load_backbone(name, options, cpu, torch.bfloat16), cpu, bf16, compile_model=False)
        x = new.backbone.transform(image).unsqueeze(0)
        with torch.inference_mode():
            got, want = new(x), old(x)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), name
    folder = hf_models["dinov3"]  # and the library's own load, cast the same way
    from transformers import AutoModel
    reference = AutoModel.from_pretrained(folder).eval().to(torch.bfloat16)
    placed = load_backbone(f"hf:{folder}", LoadOptions(), cpu, torch.bfloat16)
    x = placed.transform(image).unsqueeze(0).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(placed.embed(x), reference(pixel_values=x).pooler_output)


def test_placed_load_leaves_no_fp32_weights_behind(monkeypatch, tmp_path, tiny_clip, hf_models):
    """Once a model is placed, nothing still holds the fp32 storage it was built in (no state dict,
    no closure): watched through storage weak references taken just before the cast."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    from fgembed.backbones import Placement

    watched: list[list] = []
    apply = Placement.apply

    def watching(self, model):
        watched.append([StorageWeakRef(t.untyped_storage()) for t in (*model.parameters(), *model.buffers())
                        if t.is_floating_point()])
        apply(self, model)

    monkeypatch.setattr(Placement, "apply", watching)
    for name, options in _placement_cases(tmp_path, tiny_clip, hf_models):
        bb = load_backbone(name, options, "cpu", torch.bfloat16)
        gc.collect()
        tensors = [t for t in (*bb.model.parameters(), *bb.model.buffers()) if t.is_floating_point()]
        assert {t.dtype for t in tensors} == {torch.bfloat16}, name
        assert watched[-1] and not [ref for ref in watched[-1] if not ref.expired()], name
    meta = load_backbone("timm:test_vit", LoadOptions(pretrained=False), "meta")  # weights off the host entirely
    assert {p.device.type for p in meta.model.parameters()} == {"meta"}
    assert meta.dim == 64 and meta.input_shape == (3, 160, 160)  # probed on the meta device: test_vit
