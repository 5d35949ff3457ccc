"""Chapter 6, fine-tuning for classification: a text classifier with transformers' `Trainer`.

    python recipes/classify.py --model_name_or_path openai-community/gpt2 \\
        --data_file ../shared/data/sms_spam/SMSSpamCollection.tsv        # the book's run: last block + new head
    python recipes/classify.py --data_file ../shared/data/sms_spam/SMSSpamCollection.tsv
                                              # offline: the main job's runs/pretrain-default, scratchgpt_small.yaml
    python recipes/classify.py --model_name_or_path MODEL --train_file reviews.csv \\
        --text_column review --label_column stars                        # your own data: any columns, any labels
    torchrun --nproc_per_node 2 recipes/classify.py ...                   # several processes (DDP)

Settings come from `--config FILE.yaml` and flags, which win. Without `--config`, the model chooses: GPT-2 (and
models as wide) gets the book's settings (configs/classify/book_chapter6.yaml), a narrower ScratchGPT those
measured for the main job's model (configs/classify/scratchgpt_small.yaml), which is also the model when none is
named: `python recipes/pretrain.py`, then `python recipes/classify.py --data_file SMSSpamCollection.tsv`, runs
offline.

The run: labelled texts (a CSV, TSV, JSON, JSON Lines or Parquet file, a Hub dataset, or the book's SMS file)
-> train / validation / test (given, or a stratified 70/10/20 split; the book's balanced one for the SMS file)
-> token ids -> a pretrained ScratchGPT or GPT-2 with a new head on its last token, one output per class -> train
what `--trainable` says (resumable) -> save (LoRA merged; the label names in the config) -> accuracy, precision,
recall, F1 (macro and per class) and the confusion matrix -> metrics.json, loss and confusion plots, model card.
"""

import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from transformers import AutoConfig, DataCollatorWithPadding

from hf_scratchgpt import ScratchGPTForSequenceClassification
from hf_scratchgpt.classify import ClassificationMetrics, confusion_table, plot_confusion_matrix, soften_attention
from hf_scratchgpt.data import classification_features, classification_splits
from hf_scratchgpt.finetuning import (
    FinetuningArguments,
    config_overrides,
    load_pretrained,
    load_tokenizer,
    merge_adapters,
    select_trainable,
    trainable_summary,
)
from hf_scratchgpt.hub import is_local_path
from hf_scratchgpt.recipe import check_one_batch, check_vocabulary, finish_recipe, run_recipe, start_recipe
from hf_scratchgpt.training import LossPlotCallback, ScratchGPTTrainer

CONFIGS = Path(__file__).parent / "configs" / "classify"
BOOK_CONFIG = CONFIGS / "book_chapter6.yaml"  # GPT-2 and models of its width: the book's settings
SMALL_CONFIG = CONFIGS / "scratchgpt_small.yaml"  # narrower ScratchGPTs, such as the main job's runs/pretrain-default


@dataclass
class DataArguments:
    PATHS: ClassVar[dict] = {"data_file": "local", "train_file": "local", "validation_file": "local",
                             "test_file": "local", "dataset_name": "hub"}  # checked before any work

    train_file: str | None = field(default=None, metadata={"help": "Labelled texts: CSV, TSV, JSON, JSONL, Parquet."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation texts; default: cut from train."})
    test_file: str | None = field(default=None, metadata={"help": "Test texts; default: cut from the training data."})
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset id instead of files."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The configuration of --dataset_name."})
    data_file: str | None = field(
        default=None, metadata={"help": "The book's SMS Spam Collection ('ham|spam<TAB>text' lines, no header)."}
    )
    text_column: str = field(default="text", metadata={"help": "The column holding the texts."})
    label_column: str = field(default="label", metadata={"help": "The column holding the labels."})
    class_names: list[str] | None = field(
        default=None, metadata={"help": "Class names in id order (integer labels are ids into it); default: the "
                                "distinct labels, sorted."}
    )
    balance: bool | None = field(
        default=None, metadata={"help": "Undersample every class to the smallest (the book's spam data); default: "
                                "on for --data_file (the book's exact split), off for other data."}
    )
    split_seed: int = field(default=123, metadata={"help": "Seed of the split and the balancing (the book: 123)."})
    max_length: int | None = field(
        default=None, metadata={"help": "Tokens kept per text; default: the longest training text (the book), at "
                                "most the model's context."}
    )

    def __post_init__(self):
        if not (self.data_file or self.train_file or self.dataset_name):
            raise ValueError("pass the data: --train_file (CSV, TSV, JSON, JSON Lines, Parquet), --dataset_name (a "
                             "Hub dataset) or --data_file (the SMS Spam Collection)")
        if (self.validation_file or self.test_file) and not self.train_file:
            raise ValueError("--validation_file and --test_file go with --train_file")

    def sources(self) -> dict:
        """The arguments of `classification_splits`."""
        return {k: v for k, v in asdict(self).items() if k != "max_length"}


@dataclass
class ClassifierArguments:
    soften_attention: float | None = field(
        default=None, metadata={"help": "Scale every block's queries and keys by this before training (0.1: nearly "
                                "uniform attention to start from; helps a small pretrained model); default: off."}
    )

    def __post_init__(self):
        if self.soften_attention is not None and not 0 <= self.soften_attention <= 1:
            raise ValueError(f"--soften_attention must be in [0, 1], got {self.soften_attention}")


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    run = start_recipe("classify", (FinetuningArguments, DataArguments, ClassifierArguments), argv,
                       default_config=default_config(argv))
    model_args, data_args, classifier_args = run.args

    tokenizer = load_tokenizer(model_args)
    with run.training.main_process_first(desc="classification data"):  # the others read its datasets cache
        splits = classification_splits(**data_args.sources())
        check_splits(splits, run.training)
        labels = splits["train"].features["label"].names
        model = load_pretrained(
            ScratchGPTForSequenceClassification,
            model_args.model_name_or_path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            pad_token_id=tokenizer.pad_token_id,
            attn_implementation=run.common.attn_implementation,
            **config_overrides(model_args),
        )
        check_vocabulary(tokenizer, model, model_args.model_name_or_path)
        features = classification_features(
            splits, tokenizer, max_length=data_args.max_length, context_length=model.config.context_length
        )
    # The saved tokenizer cuts texts where training did: pipeline(..., truncation=True), scratchgpt-classify.
    tokenizer.model_max_length = data_args.max_length or max(map(len, features["train"]["input_ids"]))
    if classifier_args.soften_attention is not None:  # also when resuming: LoRA's checkpoints hold no base weights
        soften_attention(model, classifier_args.soften_attention)
    model = select_trainable(model, model_args)
    if run.training.process_index == 0:
        counts = Counter(features["train"]["label"])
        print(f"classify: {' / '.join(f'{len(s):,} {n}' for n, s in features.items())} texts; training: "
              f"{', '.join(f'{counts[i]:,} {label}' for i, label in enumerate(labels))}; {trainable_summary(model)}")

    scorer = ClassificationMetrics(labels)
    trainer = ScratchGPTTrainer(
        model=model,
        args=run.training,
        train_dataset=features["train"],
        eval_dataset=features["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=scorer,
        callbacks=[LossPlotCallback()],
        card=dict(
            tags=["text-classification"],
            pipeline_tag="text-classification",
            base_model=model_args.model_name_or_path,
            datasets=[data_args.dataset_name] if data_args.dataset_name and not is_local_path(data_args.dataset_name)
            else [],
            description=f"A ScratchGPT text classifier ({', '.join(labels)}): the book's chapter 6 fine-tuning "
            f"(trainable: {model_args.trainable}) with `recipes/classify.py` of hf_scratchgpt.",
        ),
    )
    metrics = finish_recipe(trainer, run, test_dataset=features["test"], before_save=merge_adapters,
                            after_evaluate=lambda trainer: report_confusion(trainer, scorer))
    if trainer.is_world_process_zero():
        saved = {**metrics, "labels": labels, "test_confusion_matrix": scorer.confusion_matrix}
        Path(run.training.output_dir, "metrics.json").write_text(json.dumps(saved, indent=2))
        print(f"validation accuracy {metrics.get('eval_accuracy', float('nan')):.2%}, test accuracy "
              f"{metrics['test_accuracy']:.2%}, test macro F1 {metrics['test_f1']:.4f} ("
              + ", ".join(f"{label} {metrics[f'test_f1_{label}']:.4f}" for label in labels)
              + f"); saved to {run.training.output_dir}")
    return metrics


def default_config(argv: list[str]) -> Path | None:
    """The settings of a run without `--config`: the book's for GPT-2 and models as wide (768 and more); for a
    narrower ScratchGPT, or none named (then the main job's runs/pretrain-default), those measured for it."""
    if any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        return None  # start_recipe reads the one given
    model = next((value for flag, value in zip(argv, argv[1:]) if flag == "--model_name_or_path"), None)
    model = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--model_name_or_path=")), model)
    if model is None:
        print(f"classify: no --config, no --model_name_or_path: {SMALL_CONFIG.name}, the main job's model")
        return SMALL_CONFIG
    try:
        width = AutoConfig.from_pretrained(model).hidden_size
    except (OSError, ValueError):
        return BOOK_CONFIG  # loading the model will say what is wrong with it
    chosen = BOOK_CONFIG if width >= 768 else SMALL_CONFIG
    print(f"classify: no --config: {chosen.name} for a model {width} wide")
    return chosen


def check_splits(splits, training_args) -> None:
    """One batch of training texts on every process, and texts to validate and test on, before any work."""
    check_one_batch(splits["train"], training_args, "texts")
    for name in ("validation", "test"):
        if len(splits[name]) == 0:
            raise ValueError(f"the {name} split has no texts: use more data, or give --{name}_file")


def report_confusion(trainer, scorer: ClassificationMetrics) -> dict:
    """After the test evaluation (`finish_recipe`'s `after_evaluate`): print its confusion matrix, draw it into
    confusion_matrix.png beside loss.png, and put it on the model card."""
    if trainer.is_world_process_zero():
        table = confusion_table(scorer.confusion_matrix, scorer.labels)
        print(f"\ntest confusion matrix:\n{table}\n")
        plot_confusion_matrix(scorer.confusion_matrix, scorer.labels,
                              Path(trainer.args.output_dir) / "confusion_matrix.png")
        trainer.card["description"] += f"\n\n## Test confusion matrix\n\n{table}\n\n![confusion matrix]" \
                                       "(confusion_matrix.png)"
    return {}


if __name__ == "__main__":
    run_recipe(main)
