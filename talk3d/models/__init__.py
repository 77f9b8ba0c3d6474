"""The EG3D-compatible triplane generator (mapping, StyleGAN2 backbone, OSGDecoder, super-resolution)."""
from .config import GeneratorConfig
from .decoder import OSGDecoder
from .generator import StyleGAN2Backbone, TriplaneGenerator
from .layers import (FullyConnected, SynthesisLayer, ToRGBLayer, downsample2d, modulated_conv2d, setup_filter,
                     upfirdn2d, upsample2d)
from .mapping import MappingNetwork, normalize_2nd_moment
from .superres import SuperResolution
from .synthesis import SynthesisBlock, SynthesisNetwork

__all__ = [
    "GeneratorConfig", "TriplaneGenerator", "StyleGAN2Backbone", "MappingNetwork", "SynthesisNetwork",
    "SynthesisBlock", "SuperResolution", "OSGDecoder", "FullyConnected", "SynthesisLayer", "ToRGBLayer",
    "modulated_conv2d", "upfirdn2d", "upsample2d", "downsample2d", "setup_filter", "normalize_2nd_moment",
]

# Talk3D's audio-guided deltaplane U-Net and its condition tokens.
from .attention import (GEGLUFeedForward, MultiHeadAttention, TransformerBlock, attention, plane_positional_encoding,
                        plane_positions, sinusoidal_3d)
from .deltaplane import DeltaplaneModel, DeltaplanePredictor, RollOut, rollout_plan
from .tokens import AudioNet, ConditionEncoder, SinusoidalMLP
from .unet_config import TOKEN_TYPES, DeltaplaneConfig

__all__ += [
    "DeltaplaneConfig", "TOKEN_TYPES", "DeltaplanePredictor", "DeltaplaneModel", "RollOut", "rollout_plan",
    "ConditionEncoder", "AudioNet", "SinusoidalMLP", "TransformerBlock", "MultiHeadAttention", "GEGLUFeedForward",
    "attention", "plane_positions", "plane_positional_encoding", "sinusoidal_3d",
]

from .talking_head import TalkingHead  # noqa: E402

__all__ += ["TalkingHead"]
