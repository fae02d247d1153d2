"""What a BitSkip model is: config, reference modules, quantizers, checkpoints."""

from .config import PRESETS, BitSkipConfig, ConfigError, preset
from .model import BitSkipForCausalLM

__all__ = ["BitSkipConfig", "BitSkipForCausalLM", "ConfigError", "PRESETS", "preset"]
