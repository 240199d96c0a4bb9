"""Checkpoints as users have them: each loads, or fails with one line naming what did
not match. Tiny random-init models saved the way each library saves them."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image

from fgembed.backbones import LoadOptions, load_backbone
from fgembed.errors import FgembedError


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8))


@pytest.mark.parametrize("num_classes", [0, 200])
def test_timm_headless_and_other_class_count_checkpoints_load(tmp_path, num_classes):
    """A feature extractor's checkpoint and a 200-class fine-tune's: both give the features the
    saved model's classifier sees (timm's own forward_head pre_logits)."""
    torch.manual_seed(5)
    saved = timm.create_model("test_vit", num_classes=num_classes).eval()
    torch.save({"state_dict": saved.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")  # a training script's file
    bb = load_backbone("timm:test_vit", LoadOptions(weights=tmp_path / "ckpt.pth"))
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(saved), is_training=False)
    x = transform(_image()).unsqueeze(0)
    with torch.no_grad():
        want = saved.forward_head(saved.forward_features(x), pre_logits=True)
        np.testing.assert_allclose(bb.embed(x).numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_timm_checkpoint_of_another_model_names_the_keys(tmp_path):
    torch.save(timm.create_model("test_convnext").state_dict(), tmp_path / "convnext.pth")
    with pytest.raises(FgembedError) as err:
        load_backbone("timm:test_vit", LoadOptions(weights=tmp_path / "convnext.pth"))
    message = _one_line(err)
    assert "convnext.pth does not fit timm model 'test_vit'" in message
    assert "missing: cls_token" in message or "missing: " in message
    assert "more)" in message and "unexpected: stem.0.weight" in message

    state = timm.create_model("test_vit", num_classes=0).state_dict()
    state.pop("norm.bias")
    state["pos_embed"] = state["pos_embed"][:, :5]
    torch.save(state, tmp_path / "damaged.pth")
    with pytest.raises(FgembedError) as err:
        load_backbone("timm:test_vit", LoadOptions(weights=tmp_path / "damaged.pth"))
    message = _one_line(err)
    assert "1 missing: norm.bias" in message and "1 of another shape: pos_embed [1, 5, 64]" in message


def test_timm_pickled_model_is_one_line(tmp_path):
    torch.save(timm.create_model("test_vit"), tmp_path / "whole_model.pth")  # the object, not its state
    with pytest.raises(FgembedError) as err:
        load_backbone("timm:test_vit", LoadOptions(weights=tmp_path / "whole_model.pth"))
    assert "not a safe torch file" in _one_line(err)


def test_open_clip_pickled_and_mismatched_checkpoints(tmp_path, tiny_clip):
    import open_clip

    name = f"open_clip:{tiny_clip['name']}"
    model = open_clip.create_model(tiny_clip["name"])
    torch.save(model, tmp_path / "pickled.pt")
    with pytest.raises(FgembedError) as err:
        load_backbone(name, LoadOptions(weights=tmp_path / "pickled.pt"))
    assert "not a safe torch file" in _one_line(err)

    state = torch.load(tiny_clip["weights"])
    state["visual.extra.weight"] = state.pop("visual.proj")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(FgembedError) as err:
        load_backbone(name, LoadOptions(weights=tmp_path / "renamed.pt"))
    message = _one_line(err)
    assert "renamed.pt does not fit open_clip" in message
    assert "1 missing: visual.proj" in message and "1 unexpected: visual.extra.weight" in message


def test_cli_bad_checkpoint_is_one_line_exit_2(tmp_path, manifest_csv, capsys):
    from fgembed.cli.main import main

    torch.save(timm.create_model("test_convnext").state_dict(), tmp_path / "convnext.pth")
    code = main(["extract", "--dataset", "manifest", "--root", str(manifest_csv), "--store", str(tmp_path / "s.zarr"),
                 "--backbone", "timm:test_vit", "--weights", str(tmp_path / "convnext.pth"), "--quiet"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and "does not fit timm model 'test_vit'" in errors[0]


# --- Hugging Face folders -----------------------------------------------------------------------

def test_hf_folder_of_another_architecture(tmp_path, hf_models):
    from transformers import ViTConfig, ViTModel

    vit = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16)).save_pretrained(vit)
    shutil.copy(hf_models["dinov2"] / "preprocessor_config.json", vit)
    with pytest.raises(FgembedError) as err:
        load_backbone("dinov2_vitl14", LoadOptions(weights=vit))
    message = _one_line(err)
    assert "is not the architecture of facebook/dinov2-large" in message and "model_type 'vit' (needs 'dinov2')" in message
    with pytest.raises(FgembedError) as err:  # the tiny DINOv2: right family, wrong size
        load_backbone("dinov2_vitl14", LoadOptions(weights=hf_models["dinov2"]))
    assert "hidden_size 32 (needs 1024)" in _one_line(err)


def test_hf_folder_with_missing_files(tmp_path, hf_models):
    folder = tmp_path / "dinov2"
    shutil.copytree(hf_models["dinov2"], folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(FgembedError) as err:
        load_backbone(f"hf:{folder}")
    assert "no preprocessor_config.json" in _one_line(err)
    shutil.copy(hf_models["dinov2"] / "preprocessor_config.json", folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FgembedError) as err:
        load_backbone(f"hf:{folder}")
    assert "no model.safetensors or pytorch_model.bin" in _one_line(err)
    assert load_backbone(f"hf:{folder}", LoadOptions(pretrained=False)).dim == 32  # random init needs no weights


def test_hf_folder_whose_weights_do_not_fit_its_config(tmp_path, hf_models):
    folder = tmp_path / "dinov2"
    shutil.copytree(hf_models["dinov2"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(FgembedError) as err:
        load_backbone(f"hf:{folder}")
    message = _one_line(err)
    assert "do not fit its config.json" in message and "encoder.layer.2." in message


def test_hf_folder_of_a_text_model(tmp_path, hf_models):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(bert)
    shutil.copy(hf_models["dinov2"] / "preprocessor_config.json", bert)
    with pytest.raises(FgembedError) as err:
        load_backbone(f"hf:{bert}")
    assert "holds a 'bert' model (BertModel), which takes no images" in _one_line(err)
