"""harma: HarMA adapters for CLIP-style models."""

__version__ = "0.1.0"
