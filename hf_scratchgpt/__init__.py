"""hf_scratchgpt: every chapter of "Build a Large Language Model (From Scratch)" as a Hugging Face transformers model.

Importing the package registers ScratchGPT with the Auto classes, so `AutoModelForCausalLM.from_pretrained(folder)`
works for a saved ScratchGPT; `save_pretrained` also writes the code, so a Python without this package loads the
folder with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_scratchgpt import PRESETS, ScratchGPTConfig
from .modeling_scratchgpt import (
    ScratchGPTForCausalLM,
    ScratchGPTForSequenceClassification,
    ScratchGPTModel,
    ScratchGPTPreTrainedModel,
)

AutoConfig.register(ScratchGPTConfig.model_type, ScratchGPTConfig, exist_ok=True)
AutoModel.register(ScratchGPTConfig, ScratchGPTModel, exist_ok=True)
AutoModelForCausalLM.register(ScratchGPTConfig, ScratchGPTForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(ScratchGPTConfig, ScratchGPTForSequenceClassification, exist_ok=True)

# save_pretrained copies the code files and writes `auto_map`, for trust_remote_code loading without this package.
ScratchGPTConfig.register_for_auto_class()
ScratchGPTModel.register_for_auto_class("AutoModel")
ScratchGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
ScratchGPTForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ScratchGPTConfig",
    "ScratchGPTModel",
    "ScratchGPTPreTrainedModel",
    "ScratchGPTForCausalLM",
    "ScratchGPTForSequenceClassification",
]
