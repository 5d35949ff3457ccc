"""Chapters 6 and 7 and appendix E, fine-tuning: the starting weights, and which of them train.

A fine-tuning recipe (such as `recipes/classify.py`) starts from a pretrained model: a saved ScratchGPT (a folder or
Hub id, such as the output of `recipes/pretrain.py`) or a transformers GPT-2 checkpoint (a folder, or a Hub id such
as `openai-community/gpt2`), converted on load. Then it chooses what trains:

- `last_block`: the last transformer block, the final LayerNorm and the task's new head (the book's chapter 6);
- `all`: every weight (the book's chapter 7);
- `lora`: low-rank adapters on every Linear of the blocks, through peft, with the rest frozen and the new head
  trained whole (appendix E). `merge_adapters` folds them into the weights before saving, so the saved folder is an
  ordinary ScratchGPT.
"""

from dataclasses import dataclass, field
from typing import ClassVar

from transformers import AutoConfig, PreTrainedTokenizerBase, Trainer

from .hub import check_local_path
from .modeling_scratchgpt import (
    ScratchGPTForCausalLM,
    ScratchGPTForSequenceClassification,
    ScratchGPTPreTrainedModel,
)
from .tokenization import gpt2_tokenizer_from_dir


TRAINABLE = ("last_block", "all", "lora")
LORA_TARGETS = ["qkv", "out_proj", "fc1", "fc2"]  # every Linear of every block: attention and feed-forward


@dataclass
class FinetuningArguments:
    """The model side of a fine-tuning recipe: where the weights come from and which of them train."""

    PATHS: ClassVar[dict] = {"model_name_or_path": "hub", "tokenizer": "hub"}  # checked by `start_recipe`

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained weights: a ScratchGPT or GPT-2 folder, or a Hub id (openai-community/gpt2).",
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer folder (GPT-2's encoder.json + vocab.bpe, or a saved one) or Hub id; default: the "
            "model's.",
        },
    )
    trainable: str = field(
        default="last_block", metadata={"help": "What trains: last_block (chapter 6), all (chapter 7), or lora."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (appendix E: 16)."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scale alpha; the update is alpha / r * B A."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA path."})
    drop_rate: float | None = field(default=None, metadata={"help": "The model's dropout; default: the checkpoint's."})

    def __post_init__(self):
        if self.trainable not in TRAINABLE:
            raise ValueError(f"--trainable {self.trainable!r}: expected one of {', '.join(TRAINABLE)}")
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be at least 1, got {self.lora_r}")


def load_pretrained(
    model_class: type[ScratchGPTPreTrainedModel], name_or_path: str | None, **config_overrides
) -> ScratchGPTPreTrainedModel:
    """`model_class` with the weights of a ScratchGPT or GPT-2 checkpoint; `config_overrides` (e.g. `num_labels`,
    `attn_implementation`) go to its config. A head the checkpoint lacks (a classifier's) starts new."""
    if not name_or_path:
        raise ValueError("fine-tuning starts from pretrained weights: pass --model_name_or_path")
    check_local_path("--model_name_or_path", name_or_path)
    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    if model_type == "scratchgpt":
        return model_class.from_pretrained(name_or_path, **config_overrides)
    if model_type != "gpt2":
        raise ValueError(f"--model_name_or_path {name_or_path} is a {model_type!r} model; expected ScratchGPT or GPT-2")
    converted = ScratchGPTForCausalLM.from_gpt2(name_or_path)
    attn_implementation = config_overrides.pop("attn_implementation", None)
    converted.config.update(config_overrides)
    model = model_class(converted.config)  # built anew, so that overrides such as drop_rate reach every layer
    model.model.load_state_dict(converted.model.state_dict())
    if isinstance(model, ScratchGPTForCausalLM) and not model.config.tie_word_embeddings:
        model.lm_head.load_state_dict(converted.lm_head.state_dict())
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return model


def config_overrides(args: "FinetuningArguments") -> dict:
    """The config fields that `args` sets on the loaded model (its dropout, when given)."""
    return {} if args.drop_rate is None else {"drop_rate": args.drop_rate}


def load_tokenizer(args: FinetuningArguments) -> PreTrainedTokenizerBase:
    """The tokenizer named by `--tokenizer`, else the model's; with `<|endoftext|>` as padding if it had none."""
    tokenizer = gpt2_tokenizer_from_dir(args.tokenizer or args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def select_trainable(model: ScratchGPTPreTrainedModel, args: FinetuningArguments):
    """Freeze what `args.trainable` leaves out; for `lora`, the model wrapped by peft with its adapters."""
    head = "score" if isinstance(model, ScratchGPTForSequenceClassification) else None
    if args.trainable == "all":
        return model
    if args.trainable == "last_block":
        model.requires_grad_(False)
        trained = [model.model.trf_blocks[-1], model.model.final_norm] + ([getattr(model, head)] if head else [])
        for module in trained:
            module.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=LORA_TARGETS,
        modules_to_save=[head] if head else None,  # a new head trains whole, and is saved with the adapters
    )
    return get_peft_model(model, lora)


def merge_adapters(trainer: Trainer) -> None:
    """Fold LoRA adapters into the weights they adapt (`W + alpha / r * B A`), so that the trainer saves an
    ordinary ScratchGPT; a `finish_recipe(before_save=...)` step. A model without adapters is left alone."""
    if hasattr(trainer.model, "merge_and_unload"):
        trainer.model = trainer.model_wrapped = trainer.model.merge_and_unload()


def trainable_summary(model) -> str:
    """'trainable: 7,098,626 of 124,441,346 parameters (5.70%)'."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable: {trained:,} of {total:,} parameters ({100 * trained / total:.2f}%)"


__all__ = [
    "FinetuningArguments",
    "config_overrides",
    "load_pretrained",
    "load_tokenizer",
    "merge_adapters",
    "select_trainable",
    "trainable_summary",
]
