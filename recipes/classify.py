"""Stage 7, fine-tuning for classification (the book's chapter 6): a spam classifier with transformers' `Trainer`.

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

import numpy as np
import torch
from transformers import DataCollatorWithPadding, TrainingArguments

from hf_scratchgpt import ScratchGPTForSequenceClassification
from hf_scratchgpt.arguments import check_output_dir, parse_recipe_args, resolve_checkpoint, run_recipe
from hf_scratchgpt.data import SMS_LABELS, classification_features, load_sms_spam, sms_spam_splits
from hf_scratchgpt.finetuning import (
    FinetuningArguments,
    check_vocabulary,
    load_pretrained,
    load_tokenizer,
    select_trainable,
    trainable_summary,
)
from hf_scratchgpt.metrics import load_metric
from hf_scratchgpt.training import LossPlotCallback, ScratchGPTTrainer

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "classify" / "book_chapter6.yaml"


@dataclass
class DataArguments:
    data_file: str | None = field(
        default=None, metadata={"help": "The SMS Spam Collection: 'ham|spam<TAB>text' lines (SMSSpamCollection)."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Tokens kept per message; default: the longest training message (book)."}
    )
    split_seed: int = field(default=123, metadata={"help": "Seed of the balanced split (the book: 123)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Write over a model in output_dir."})


def main(argv=None) -> dict:
    model_args, data_args, training_args = parse_recipe_args(
        (FinetuningArguments, DataArguments, TrainingArguments),
        argv,
        default_config=DEFAULT_CONFIG,
        defaults=dict(use_cpu=not torch.accelerator.is_available(), ddp_find_unused_parameters=False),
    )
    if not data_args.data_file:
        raise ValueError("pass --data_file, the SMS Spam Collection ('ham|spam<TAB>text' lines)")
    check_output_dir(training_args, data_args.overwrite_output_dir)
    checkpoint = resolve_checkpoint(training_args)

    splits = sms_spam_splits(load_sms_spam(data_args.data_file), seed=data_args.split_seed)
    tokenizer = load_tokenizer(model_args)
    model = load_pretrained(
        ScratchGPTForSequenceClassification,
        model_args.model_name_or_path,
        num_labels=len(SMS_LABELS),
        id2label=dict(enumerate(SMS_LABELS)),
        label2id={label: i for i, label in enumerate(SMS_LABELS)},
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=model_args.attn_implementation,
    )
    check_vocabulary(tokenizer, model, model_args.model_name_or_path)
    features = classification_features(
        splits, tokenizer, max_length=data_args.max_length, context_length=model.config.context_length
    )
    model = select_trainable(model, model_args)
    if training_args.process_index == 0:
        print(f"classify: {len(features['train'])} / {len(features['validation'])} / {len(features['test'])} "
              f"messages; {trainable_summary(model)}")

    trainer = ScratchGPTTrainer(
        model=model,
        args=training_args,
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
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    if model_args.trainable == "lora":  # save an ordinary ScratchGPT: the adapters merged into the weights
        trainer.model = trainer.model_wrapped = trainer.model.merge_and_unload()
    trainer.save_model()  # weights, config with labels and auto_map, code files, tokenizer
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    metrics = trainer.evaluate()
    metrics.update(trainer.evaluate(features["test"], metric_key_prefix="test"))
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        trainer.create_model_card()
        print(f"validation accuracy {metrics['eval_accuracy']:.2%}, test accuracy {metrics['test_accuracy']:.2%}; "
              f"saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return metrics


def accuracy_of_logits(prediction) -> dict:
    """Trainer's `compute_metrics`: accuracy of the arg-max class, with the offline `evaluate` module."""
    return accuracy_metric().compute(predictions=np.argmax(prediction.predictions, axis=-1), references=prediction.label_ids)


@functools.cache
def accuracy_metric():
    return load_metric("accuracy")


if __name__ == "__main__":
    run_recipe(main)
