"""Quantization: GGML block kernels (ggml.py), GGUF type policy (policy.py), bitsandbytes (bnb.py)."""
