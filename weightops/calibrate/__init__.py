"""Calibration: running text through a model's layers to measure its activations (the
importance matrix llama.cpp's weighted quantizers use), one decoder layer at a time."""
