"""Quantization: the GGML and GGUF file type table (ggml_types.py), GGML block kernels (ggml.py),
GGUF type policy (policy.py), bitsandbytes (bnb.py)."""
