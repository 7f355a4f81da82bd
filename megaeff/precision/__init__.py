"""COAT-style FP8: quantization formats, FP8 optimizer states, FP8 activations and FP8 GEMMs."""
