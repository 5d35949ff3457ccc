"""hf_scratchgpt: the GPT of "Build a Large Language Model (From Scratch)" as a Hugging Face transformers model."""

from transformers import AutoConfig

from .configuration_scratchgpt import PRESETS, ScratchGPTConfig

AutoConfig.register(ScratchGPTConfig.model_type, ScratchGPTConfig)

__version__ = "0.1.0"
