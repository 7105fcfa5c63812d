"""fast_unet: a fast drop-in for the DDPM noise-prediction UNet (see README.md)."""
from .model import UNet, DoubleConv, Down, Up, SelfAttention
from . import ops, dispatch

__version__ = "0.1.0"
__all__ = ["UNet", "DoubleConv", "Down", "Up", "SelfAttention", "ops", "dispatch", "__version__"]
