"""The script a user writes instead of fgembed: a timm model, timm's own eval transform, a plain
DataLoader, autocast on CUDA, features to .npy. A peer for benchmarks/extract.py, run as its own
process: `python naive.py ROOT MODEL OUT.npy BATCH WORKERS DEVICE`. Prints one JSON line.

The random init is seeded as fgembed seeds it (`torch.manual_seed(0)` before `create_model`), so
the features can be compared with fgembed's.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import timm
import timm.data
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset


class Files(Dataset):
    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(Image.open(self.files[i]).convert("RGB"))


def main() -> None:
    root, name, out, batch, workers, device = sys.argv[1:7]
    cuda = device.startswith("cuda")
    files = sorted(Path(root).rglob("*.jpg"))
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval().to(device)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    loader = DataLoader(Files(files, transform), batch_size=int(batch), num_workers=int(workers), pin_memory=cuda)
    features, steady_start, first = [], None, 0
    with torch.inference_mode(), torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
        for x in loader:
            if first and steady_start is None:
                steady_start = time.perf_counter()
            first = first or len(x)
            out_batch = model.forward_head(model.forward_features(x.to(device, non_blocking=True)), pre_logits=True)
            features.append(out_batch.float().cpu())
    end = time.perf_counter()
    np.save(out, torch.cat(features).numpy())
    steady = (len(files) - first) / (end - steady_start) if steady_start else 0.0
    print(json.dumps({"images": len(files), "steady_images_per_s": steady}))


if __name__ == "__main__":
    main()
