"""Helpers that run the real runtime components (Triton) from their PyPI wheels."""
