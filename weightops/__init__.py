"""weightops: streaming tensor operators for LLM release engineering."""
