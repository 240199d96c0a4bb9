"""The analysis stage: run directories and stores → tables, plots and scores.

`ensemble` fuses runs (late fusion streamed over row blocks), `report` turns entries into tables,
`novelty` / `novelty_runs` score open-set detection, `similarity` measures how far two datasets'
class means lie apart. Reads what the earlier stages wrote; imports flow one way (an ensemble
fits the member runs it is missing through `classify.fitting`, never the reverse).
"""
