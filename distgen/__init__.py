"""distgen: distributed training of image generative models."""

__version__ = "0.1.0"
