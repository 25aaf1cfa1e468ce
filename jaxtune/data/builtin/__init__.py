"""Built-in datasets that need no download (procedurally generated)."""
