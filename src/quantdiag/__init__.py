"""quantdiag: tell why a post-training-quantized LLM fails, and whether it can be repaired."""

__version__ = "0.1.0"
