"""Built-in datasets that need no download (procedurally generated), selected by `data.builtin`.

They are not sources (where records are read from: data/sources.py SOURCE_KINDS) but datasets
that generate their own training and held-out records.
"""

BUILTIN_DATASETS = ("quickstart", "verifiable", "clusters")  # quickstart.py, verifiable.py, clusters.py
