"""sitegen: a static HTML atlas of every layer and every channel of a trained PyTorch CNN."""

__version__ = "0.1.0"
