"""thingsvision (2.7.x) as a peer for benchmarks/extract.py, run under the Python that has it
installed: `python thingsvision_peer.py ROOT MODEL OUT_DIR BATCH DEVICE`. Its own API throughout
(`get_extractor`, `ImageDataset`, its `DataLoader`, `extract_features`), the timm model's
`global_pool` output (what fgembed stores for a timm convnet). Prints one JSON line; the steady
state is read off the batches as thingsvision's loader yields them.
"""
import json
import sys
import time

import numpy as np
from thingsvision import get_extractor
from thingsvision.utils.data import DataLoader, ImageDataset


class Timed:
    """thingsvision's batches, with the moment the second one was asked for."""

    def __init__(self, batches):
        self.batches, self.steady_start, self.first = batches, None, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            if self.first and self.steady_start is None:
                self.steady_start = time.perf_counter()
            self.first = self.first or len(batch)
            yield batch


def main() -> None:
    root, name, out, batch, device = sys.argv[1:6]
    extractor = get_extractor(model_name=name, source="timm", device=device, pretrained=False)
    dataset = ImageDataset(root=root, out_path=out, backend=extractor.get_backend(),
                           transforms=extractor.get_transformations())
    batches = Timed(DataLoader(dataset=dataset, batch_size=int(batch), backend=extractor.get_backend()))
    features = extractor.extract_features(batches=batches, module_name="global_pool", flatten_acts=True)
    end = time.perf_counter()
    np.save(f"{out}/features.npy", features)
    steady = (len(features) - batches.first) / (end - batches.steady_start) if batches.steady_start else 0.0
    print(json.dumps({"images": len(features), "steady_images_per_s": steady}))


if __name__ == "__main__":
    main()
