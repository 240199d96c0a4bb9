"""Fixtures: generated images in each dataset's real format and tiny random-init models saved the
way each source library ships real ones (timm checkpoints, an open_clip config + weights,
Hugging Face model folders). Nothing is mocked: every test goes through the real libraries."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch

from fgembed.synthetic import (
    generate,
    write_cub,
    write_folder_layout,
    write_inat21,
    write_manifest,
)

TINY_CLIP = "fgembed-test-clip"
TINY_CLIP_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    # vocab_size: open_clip's own tokenizer (SimpleTokenizer) emits ids up to 49407, so the text tower works
}
TIMM_TINY = ("timm:test_vit", "timm:test_convnext", "timm:test_resnet")


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """3 groups × 2 classes × 10 images: (root, records)."""
    root = tmp_path_factory.mktemp("synthetic")
    return root, generate(root, groups=3, classes_per_group=2, per_class=10, size=(80, 60))


@pytest.fixture(scope="session")
def cub_root(images):
    root, records = images
    return write_cub(root, records)


@pytest.fixture(scope="session")
def inat_root(images):
    root, records = images
    return write_inat21(root, records)


@pytest.fixture(scope="session")
def manifest_csv(images):
    root, records = images
    return write_manifest(root, records)


@pytest.fixture(scope="session")
def folder_root(images, tmp_path_factory):
    root, records = images
    return write_folder_layout(root, records, tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """Register the tiny config with open_clip (in-process) and also package it as a
    `local-dir:` folder (config + weights) for subprocess runs."""
    d = tmp_path_factory.mktemp("clip")
    cfg_file = d / f"{TINY_CLIP}.json"
    cfg_file.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(cfg_file)
    torch.manual_seed(1)
    model = open_clip.create_model(TINY_CLIP)
    weights = d / "tiny_clip.pt"
    torch.save(model.state_dict(), weights)
    local = d / "local"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CLIP_CFG,
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                           "resize_mode": "squash"}}))
    torch.save(model.state_dict(), local / "open_clip_pytorch_model.bin")
    return {"name": TINY_CLIP, "weights": weights, "local_dir": local}


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """Tiny DINOv2 and DINOv3 (4 register tokens) folders, each with its own image processor."""
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
        DINOv3ViTConfig,
        DINOv3ViTImageProcessor,
        DINOv3ViTModel,
    )

    d = tmp_path_factory.mktemp("hf")
    torch.manual_seed(2)
    v2 = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, image_size=56, patch_size=14))
    v2.save_pretrained(d / "dinov2")
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, resample=3,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
                      ).save_pretrained(d / "dinov2")
    v3 = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, image_size=64, patch_size=16,
                                        num_register_tokens=4))
    v3.save_pretrained(d / "dinov3")
    DINOv3ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(d / "dinov3")
    return {"dinov2": d / "dinov2", "dinov3": d / "dinov3"}


def run_cli(*args: str, check: bool = False, timeout: float = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run `python -m fgembed ARGS` as a user would."""
    proc = subprocess.run([sys.executable, "-m", "fgembed", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"fgembed {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on a free localhost port: moto's standalone server (the endpoint s3fs's own
    test suite uses), reached the way s3fs finds any endpoint — through the AWS environment
    variables, which the fixture sets for the session (and `aws_env` hands to child processes)."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        import fsspec

        fsspec.filesystem("s3").mkdir("fgembed-test")
        yield env
    server.stop()


@pytest.fixture()
def s3_url(s3_endpoint, request):
    """A fresh store URL in the test bucket, one per test."""
    import uuid

    return f"s3://fgembed-test/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}/store.zarr"
