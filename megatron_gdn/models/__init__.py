"""The Gated DeltaNet model, with flash-linear-attention's class names and interfaces."""

from .configuration import MODEL_PRESETS, GatedDeltaNetConfig
from .gated_deltanet import GatedDeltaNet, RMSNorm, ShortConvolution
from .language_model import CausalLMOutput, GatedDeltaNetBlock, GatedDeltaNetForCausalLM, GatedDeltaNetModel, GatedMLP
from .utils import Cache

__all__ = [
    "MODEL_PRESETS", "GatedDeltaNetConfig", "GatedDeltaNet", "RMSNorm", "ShortConvolution", "CausalLMOutput",
    "GatedDeltaNetBlock", "GatedDeltaNetForCausalLM", "GatedDeltaNetModel", "GatedMLP", "Cache",
]
