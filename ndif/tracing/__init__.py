"""Capturing ``with`` blocks as source and compiling them (no model knowledge here)."""
