"""Nested-bit weight format: quantization to master codes, bit planes, checkpoint files."""
