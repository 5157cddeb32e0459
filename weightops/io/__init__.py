"""On-disk formats: one module per format, plus atomic output and sharded-index helpers."""
