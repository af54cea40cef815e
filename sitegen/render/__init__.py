"""Rendering: reads pass results, draws pictures, fills templates. Computes no analysis."""
