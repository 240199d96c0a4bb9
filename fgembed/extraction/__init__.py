"""The extraction stage: images → frozen backbones → the feature store (GPU, run once).

`extract` is the engine (start-up order, store, ranks; its loop in `_pass`, the workers' side of
the feed in `feeds`, the device's in `device_decode`, the CPU thread split in `threads`);
`interchange` brings features computed elsewhere into a store (`fgembed import` / `export`);
`bench` measures what each backbone costs. Nothing here imports the classifier or analysis stages.
"""
