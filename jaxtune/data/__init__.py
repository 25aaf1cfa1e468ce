"""Input pipeline: sources -> FLAN-style templates -> tokenize/mask -> pack -> batch (Grain)."""
