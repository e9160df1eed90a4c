"""Shipped model weights (safetensors); installed as the package ``idfzip._models``."""
