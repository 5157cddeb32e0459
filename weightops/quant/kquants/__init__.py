"""llama.cpp's K-quants (Q2_K..Q6_K) in vectorised torch, byte for byte libggml's encoders at the
pinned commit (facts: shared/reference/kquants.md).

Blocks are super-blocks of 256 values; the reference reduces within a block sequentially in
float32, so the kernels loop over the element positions of a block and vectorise across
blocks (`common`). `affine` holds the types with a scale and a minimum per sub-block (Q2_K,
Q4_K, Q5_K: `make_qkx2_quants`), `symmetric` those with a signed scale only (Q3_K, Q6_K).
"""
