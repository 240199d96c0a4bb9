"""The classifier stage: a store's rows → trained heads in run directories (seconds to minutes).

`views` builds the design rows (single / concat / PCA-sum, hold-outs, shots) and `fusion` is the
math behind them; `heads`, `baselines`, `train` and `longtail` are the models and their training
loop; `runs` fits them into run directories (`_logits` writes their logits), `level_runs` and
`hierarchy` do the same for taxonomy-aware heads, whose decoders and metrics are in
`hierarchy_metrics`; `metrics` scores predictions. Reads the store, never the extraction code.
"""
