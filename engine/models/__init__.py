"""The CMD networks and the bundle that holds one model's networks together."""

from engine.models.autoencoder import CMDAutoencoder
from engine.models.bundle import CMDModel
from engine.models.content import build_content_unet, load_content_unet
from engine.models.motion_dit import MotionDiT
from engine.models.text import TextEncoder

__all__ = ["CMDAutoencoder", "CMDModel", "MotionDiT", "TextEncoder", "build_content_unet", "load_content_unet"]
