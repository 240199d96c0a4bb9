"""The classifier stage: a store's rows → trained heads in run directories (seconds to minutes).

`views` builds the design rows (single / concat / PCA-sum, hold-outs, shots) and `fusion` is the
math behind them; `heads`, `baselines`, `train` and `longtail` are the models and their training
loop; `runs` (and `level_runs` for taxonomy-aware heads, `hierarchy`) fit them into run
directories; `metrics` scores predictions. Reads the store, never the extraction code.
"""
