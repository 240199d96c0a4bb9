"""Backbone cost (the accuracy-vs-cost study): counts cross-checked by hand and by module hooks, JSON shape, the
store round trip and the errors a user hits. Timings are run (tiny models, few repeats), never
asserted."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fgembed.cli.main import app
from typer.testing import CliRunner

from fgembed.backbones import LoadOptions, load_backbone
from fgembed.datasets.table import SampleTable
from fgembed.errors import FgembedError
from fgembed.extraction.bench import (
    BenchOptions,
    bench,
    count_macs,
    count_params,
    read_cost,
)
from fgembed.store import FeatureStore

FAST = {"batch_size": 2, "warmup": 1, "repeats": 2, "latency_repeats": 3, "images": 4, "workers": 0, "progress": False,
        "device": "cpu"}
KEYS = {"backbone", "params", "gmacs", "gflops", "throughput", "latency_p50_ms", "latency_p95_ms", "peak_memory_mb",
        "e2e_images_per_s", "device", "precision", "batch_size"}


def test_macs_of_linear_and_conv_are_the_hand_count():
    linear = torch.nn.Linear(10, 20)
    assert count_macs(linear, torch.zeros(3, 10)) == 3 * 10 * 20  # nn.Linear: in × out per row
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1, groups=2), nn.Flatten(),
                          nn.Linear(4 * 10 * 10, 5))
    conv1 = 8 * 10 * 10 * (3 * 3 * 3)  # output elements × (in channels × kernel area)
    conv2 = 4 * 10 * 10 * (8 // 2)  # grouped: each output sees in/groups channels
    assert count_macs(model, torch.zeros(2, 3, 10, 10)) == 2 * (conv1 + conv2 + 400 * 5)


def hook_count(backbone) -> int:
    """An independent count from module forward hooks: every Conv2d/Linear call by its shapes, plus
    the two attention matmuls (q·kᵀ and attn·v, N²·C each) per attention call. nn.MultiheadAttention
    (open_clip) uses its projection weights without calling them as modules: in/out projections too.
    Norms, activations and pooling are not counted, by either side."""
    from timm.layers import Attention
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Attention

    total = 0

    def hook(module, args, kwargs, output):
        nonlocal total
        x = args[0] if args else next(iter(kwargs.values()))  # the query / hidden states
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * module.in_channels // module.groups * kh * kw
        elif isinstance(module, torch.nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, torch.nn.MultiheadAttention):
            b, n, e = x.shape if module.batch_first else x.transpose(0, 1).shape
            total += b * n * 4 * e * e + 2 * b * n * n * e
        else:
            b, n, c = x.shape
            total += 2 * b * n * n * c

    kinds = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.MultiheadAttention, Attention, Dinov2Attention)
    modules = [m for m in backbone.model.modules() if isinstance(m, kinds)]
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    with torch.inference_mode():
        backbone.embed(torch.zeros(1, *backbone.input_shape))
    for h in handles:
        h.remove()
    proj = getattr(getattr(backbone.model, "visual", None), "proj", None)  # open_clip: a bare `x @ proj`
    return total + (proj.numel() if isinstance(proj, torch.nn.Parameter) else 0)


@pytest.mark.parametrize("name", ["timm:test_vit", "timm:test_resnet", "open_clip", "hf"])
def test_counts_match_module_hooks(name, tiny_clip, hf_models):
    name = {"open_clip": f"open_clip:{tiny_clip['name']}", "hf": f"hf:{hf_models['dinov2']}"}.get(name, name)
    backbone = load_backbone(name, LoadOptions(pretrained=False))
    macs = count_macs(backbone.embed, torch.zeros(1, *backbone.input_shape))
    assert macs > 0 and macs == hook_count(backbone)


@pytest.mark.parametrize("name", ["timm:test_vit", "timm:test_resnet"])
def test_bench_reports_the_counts(name):
    backbone = load_backbone(name, LoadOptions(pretrained=False))
    macs = count_macs(backbone.embed, torch.zeros(1, *backbone.input_shape))
    (result,) = bench([name], BenchOptions(load=LoadOptions(pretrained=False), **{**FAST, "images": 0}))
    assert result.params == count_params(backbone.model) == sum(p.numel() for p in backbone.model.parameters())
    assert result.gmacs == pytest.approx(macs / 1e9) and result.gflops == pytest.approx(2 * result.gmacs)
    assert result.e2e_images_per_s is None and result.input_shape == list(backbone.input_shape)


def _store(tmp_path, name="timm:test_resnet", input_shape=(3, 160, 160)):
    table = SampleTable("synthetic", str(tmp_path), np.arange(4), [f"{i}.jpg" for i in range(4)], np.zeros(4),
                        ["x"], np.zeros(4))
    store = FeatureStore.create(tmp_path / "s.zarr", table, shard_rows=4)
    store.prepare(name, {"source": "timm", "model": name, "input_shape": list(input_shape)}, 96)
    return store


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_json_and_the_store_round_trip(tmp_path):
    store = _store(tmp_path)
    assert read_cost(store, "timm:test_resnet") is None
    args = ["bench", "--backbone", "timm:test_resnet", "--no-pretrained", "--device", "cpu", "--batch-size", 2,
            "--warmup", 1, "--repeats", 2, "--latency-repeats", 3, "--workers", 0, "--quiet"]
    result = invoke(*args, "--images", 4, "--format", "json", "--store", store.path)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert KEYS <= set(row) and row["device"] == "cpu" and row["precision"] == "fp32" and row["batch_size"] == 2
    assert row["gflops"] == pytest.approx(2 * row["gmacs"]) and row["e2e_images_per_s"] > 0
    assert min(row["throughput"], row["latency_p50_ms"]) > 0 and row["latency_p95_ms"] >= row["latency_p50_ms"]
    cost = read_cost(store, "timm:test_resnet")
    assert {k: cost[k] for k in ("params", "gmacs", "gflops")} == {k: row[k] for k in ("params", "gmacs", "gflops")}
    (measured,) = cost["measurements"].values()
    assert measured["throughput"] == row["throughput"] and measured["precision"] == "fp32"
    fingerprint = FeatureStore.open(store.path).backbone_info("timm:test_resnet").fingerprint
    assert "cost" not in fingerprint  # outside the fingerprint: a bench never makes a store "differ"
    table = invoke(*args, "--images", 0)
    assert table.exit_code == 0 and "GMACs" in table.stdout and "peak RSS" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["--backbone", "resnet_nope"], "unknown backbone 'resnet_nope'"),
    (["--backbone", "timm:test_resnet", "--precision", "fp16"], "fp16 needs a CUDA device"),
    (["--backbone", "timm:test_resnet", "--format", "xml"], "unknown --format 'xml'"),
    (["--backbone", "timm:test_resnet~big"], "after '~' comes an image size"),
    (["--backbone", "timm:test_resnet~96", "--image-size", "64"], "names 96 px but --image-size is 64"),
    (["--backbone", "timm:test_vit", "--store", "{store}"], "has no features 'timm:test_vit'"),
    (["--backbone", "timm:test_resnet", "--image-size", "64", "--store", "{store}"],
     "benchmarked at input [3, 64, 64] but its features"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    store = _store(tmp_path)
    args = [str(store.path) if a == "{store}" else a for a in args]
    result = invoke("bench", *args, "--no-pretrained", "--device", "cpu", "--batch-size", 1, "--warmup", 0,
                    "--repeats", 1, "--latency-repeats", 2, "--images", 0, "--quiet")
    assert isinstance(result.exception, FgembedError), result.output
    assert result.exception.exit_code == 2 and message in str(result.exception)
    assert "\n" not in str(result.exception)


def test_both_throughputs_time_the_same_forward(monkeypatch):
    """The e2e run's forward shares the cores with its decode workers; the model-only figure used to
    take every core, so on a small or shared machine (where more threads can be slower) it came out
    below the e2e figure. Now the model-only run uses the forward threads the extraction settled on."""
    import fgembed.extraction.bench as bench_module

    seen = {}
    real_extract, real_measure = bench_module.extract, bench_module._measure

    def extract(*args, **kwargs):
        summary = real_extract(*args, **kwargs)
        seen["e2e"] = summary.forward_threads[-1][0]
        return summary

    def measure(*args):
        seen["asked"] = args[-1]  # the threads `_measure` sets for its timed forwards
        return real_measure(*args)

    monkeypatch.setattr(bench_module, "extract", extract)
    monkeypatch.setattr(bench_module, "_measure", measure)
    (result,) = bench(["timm:test_resnet"], BenchOptions(load=LoadOptions(pretrained=False), **{**FAST, "workers": 1}))
    assert result.threads == seen["e2e"] == seen["asked"] and result.e2e_images_per_s > 0
