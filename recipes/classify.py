"""Chapter 6, fine-tuning for classification: a spam classifier with transformers' `Trainer`.

    python recipes/classify.py --model_name_or_path openai-community/gpt2 \\
        --data_file ../shared/data/sms_spam/SMSSpamCollection.tsv        # the book's run: last block + new head
    python recipes/classify.py --config recipes/configs/classify/lora.yaml --model_name_or_path ... --data_file ...
    torchrun --nproc_per_node 2 recipes/classify.py ...                   # several processes (DDP)

Settings come from `--config FILE.yaml` (default: recipes/configs/classify/book_chapter6.yaml) and flags, which
win. The run: SMS messages -> the book's balanced 70/10/20 split -> token ids -> a pretrained ScratchGPT or GPT-2
with a new 2-class head on its last token -> train what `--trainable` says (resumable) -> save (LoRA merged)
-> validation and test accuracy -> loss plot and model card.
"""

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from transformers import DataCollatorWithPadding

from hf_scratchgpt import ScratchGPTForSequenceClassification
from hf_scratchgpt.data import SMS_LABELS, classification_features, load_sms_spam, sms_spam_splits
from hf_scratchgpt.finetuning import (
    FinetuningArguments,
    config_overrides,
    load_pretrained,
    load_tokenizer,
    merge_adapters,
    select_trainable,
    trainable_summary,
)
from hf_scratchgpt.metrics import load_metric
from hf_scratchgpt.recipe import check_vocabulary, finish_recipe, run_recipe, start_recipe
from hf_scratchgpt.training import LossPlotCallback, ScratchGPTTrainer

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "classify" / "book_chapter6.yaml"


@dataclass
class DataArguments:
    PATHS: ClassVar[dict] = {"data_file": "local"}  # checked before any work

    data_file: str | None = field(
        default=None,
        metadata={"help": "The SMS Spam Collection: 'ham|spam<TAB>text' lines (SMSSpamCollection)."},
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Tokens kept per message; default: the longest training message (book)."}
    )
    split_seed: int = field(default=123, metadata={"help": "Seed of the balanced split (the book: 123)."})

    def __post_init__(self):
        if not self.data_file:
            raise ValueError("pass --data_file, the SMS Spam Collection ('ham|spam<TAB>text' lines)")


def main(argv=None) -> dict:
    run = start_recipe("classify", (FinetuningArguments, DataArguments), argv, default_config=DEFAULT_CONFIG)
    model_args, data_args = run.args

    splits = sms_spam_splits(load_sms_spam(data_args.data_file), seed=data_args.split_seed)
    tokenizer = load_tokenizer(model_args)
    model = load_pretrained(
        ScratchGPTForSequenceClassification,
        model_args.model_name_or_path,
        num_labels=len(SMS_LABELS),
        id2label=dict(enumerate(SMS_LABELS)),
        label2id={label: i for i, label in enumerate(SMS_LABELS)},
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=run.common.attn_implementation,
        **config_overrides(model_args),
    )
    check_vocabulary(tokenizer, model, model_args.model_name_or_path)
    features = classification_features(
        splits, tokenizer, max_length=data_args.max_length, context_length=model.config.context_length
    )
    model = select_trainable(model, model_args)
    if run.training.process_index == 0:
        print(f"classify: {len(features['train'])} / {len(features['validation'])} / {len(features['test'])} "
              f"messages; {trainable_summary(model)}")

    trainer = ScratchGPTTrainer(
        model=model,
        args=run.training,
        train_dataset=features["train"],
        eval_dataset=features["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy_of_logits,
        callbacks=[LossPlotCallback()],
        card=dict(
            tags=["text-classification", "spam"],
            pipeline_tag="text-classification",
            base_model=model_args.model_name_or_path,
            description="A ScratchGPT spam classifier: the book's chapter 6 fine-tuning on the SMS Spam Collection "
            f"(trainable: {model_args.trainable}), with `recipes/classify.py` of hf_scratchgpt.",
        ),
    )
    metrics = finish_recipe(trainer, run, test_dataset=features["test"], before_save=merge_adapters)
    if trainer.is_world_process_zero():
        print(f"validation accuracy {metrics['eval_accuracy']:.2%}, test accuracy {metrics['test_accuracy']:.2%}; "
              f"saved to {run.training.output_dir}")
    return metrics


def accuracy_of_logits(prediction) -> dict:
    """Trainer's `compute_metrics`: accuracy of the arg-max class, with the offline `evaluate` module."""
    return accuracy_metric().compute(predictions=np.argmax(prediction.predictions, axis=-1), references=prediction.label_ids)


@functools.cache
def accuracy_metric():
    return load_metric("accuracy")


if __name__ == "__main__":
    run_recipe(main)
