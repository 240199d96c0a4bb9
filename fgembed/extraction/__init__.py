"""The extraction stage: images → frozen backbones → the feature store (GPU, run once).

`extract` is the engine (loader, per-backbone transforms, writer, ranks), `interchange` brings
features computed elsewhere into a store (`fgembed import` / `export`), `bench` measures what each
backbone costs. Nothing here imports the classifier or analysis stages.
"""
