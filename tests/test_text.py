"""Zero-shot class embeddings from an open_clip text tower, against open_clip's own encode_text."""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from fgembed.backbones import (
    PROMPT_TEMPLATES,
    LoadOptions,
    clean_class_name,
    load_backbone,
    text_embeddings,
)
from fgembed.errors import FgembedError

NAMES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "Anas platyrhynchos"]


def test_class_names_are_cleaned_as_cub_and_inat_need():
    assert [clean_class_name(n) for n in NAMES] == ["Black footed Albatross", "Laysan Albatross", "Anas platyrhynchos"]
    assert clean_class_name("200.Common_Yellowthroat") == "Common Yellowthroat"
    assert clean_class_name("Passer domesticus") == "Passer domesticus"


def test_templates_are_open_clips_own():
    assert PROMPT_TEMPLATES == tuple(t("{}") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES)


def _reference(model, tokenizer, names: list[str]) -> np.ndarray:
    """Each class: its prompts through encode_text, normalised, averaged, normalised."""
    rows = []
    with torch.no_grad():
        for name in names:
            emb = F.normalize(model.encode_text(tokenizer([t.format(name) for t in PROMPT_TEMPLATES])), dim=-1)
            rows.append(F.normalize(emb.mean(0), dim=0))
    return torch.stack(rows).numpy()


def test_text_embeddings_equal_encode_text(tiny_clip):
    bb = load_backbone(f"open_clip:{tiny_clip['name']}", LoadOptions(weights=tiny_clip["weights"]))
    assert bb.has_text
    got = text_embeddings(bb, NAMES)
    assert got.shape == (3, 24) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    model = open_clip.create_model(tiny_clip["name"], pretrained=str(tiny_clip["weights"])).eval()
    want = _reference(model, open_clip.get_tokenizer(tiny_clip["name"]), [clean_class_name(n) for n in NAMES])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[0], got[1], atol=1e-3)  # the names matter
    # open_clip's `local-dir:` package: its own tokenizer config, the same weights
    local = load_backbone(f"open_clip:local-dir:{tiny_clip['local_dir']}")
    np.testing.assert_allclose(text_embeddings(local, NAMES), want, rtol=1e-5, atol=1e-6)


def test_no_text_tower_is_one_line():
    bb = load_backbone("timm:test_resnet", LoadOptions(pretrained=False))
    assert not bb.has_text
    with pytest.raises(FgembedError, match="has no text tower"):
        text_embeddings(bb, NAMES)


def test_zeroshot_head_from_text_stored_at_extraction(tmp_path, tiny_clip, manifest_csv):
    """`extract --text` stores the class-name embeddings; `--head zeroshot` scores with them."""
    from fgembed.classify.config import HeadConfig, RunConfig
    from fgembed.classify.fitting import fit_run
    from fgembed.classify.views import ViewConfig
    from fgembed.datasets import load_dataset
    from fgembed.extraction.extract import ExtractOptions, extract
    from fgembed.store import FeatureStore

    name = f"open_clip:{tiny_clip['name']}"
    load = LoadOptions(weights=tiny_clip["weights"])
    table = load_dataset("manifest", manifest_csv)
    extract(table, tmp_path / "s.zarr", [name],
            ExtractOptions(load=load, workers=0, progress=False, device="cpu", text=True))
    store = FeatureStore.open(tmp_path / "s.zarr")
    text, scale = store.text(name)
    np.testing.assert_allclose(text, text_embeddings(load_backbone(name, load), store.class_names), atol=1e-6)
    assert scale == pytest.approx(1 / 0.07, rel=1e-4)  # open_clip's initial logit scale
    run = fit_run(store, RunConfig(view=ViewConfig(features=(name,)), head=HeadConfig(head="zeroshot")),
                  tmp_path / "runs", device="cpu")
    rows, logits = run.logits("test")
    emb = store.features(name)[rows]
    want = scale * (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ text.T
    np.testing.assert_allclose(np.asarray(logits[0], np.float32), want, atol=0.02)
    with pytest.raises(FgembedError, match="text tower"):
        extract(table, tmp_path / "t.zarr", ["timm:test_resnet"],
                ExtractOptions(load=LoadOptions(pretrained=False), workers=0, progress=False, device="cpu", text=True))
