"""Chapter 7, fine-tuning to follow instructions: a pretrained GPT learns to answer with transformers' `Trainer`.

    python recipes/instruct.py --config recipes/configs/instruct/cpu.yaml --model_name_or_path runs/pretrain-default \\
        --train_file ../shared/data/instruction/instruction-data.json      # offline, minutes on a CPU
    python recipes/instruct.py --config recipes/configs/instruct/book_chapter7.yaml \\
        --train_file instruction-data.json                                   # the book's run: GPT-2 medium
    torchrun --nproc_per_node 2 recipes/instruct.py ...                      # several processes (DDP)

The run: entries (the book's JSON, JSON Lines, a Hub dataset, or chat `messages`) -> the book's 85/10/5 split ->
the Alpaca prompt, also saved as the tokenizer's chat template -> prompt + response + end-of-text ids -> train
what `--trainable` says (resumable; `--packing` puts several examples in a row) -> save -> answer every test
instruction -> test-responses.json, ROUGE-L, exact match, stop rate and an optional LLM judge in metrics.json.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from transformers import IntervalStrategy, TrainerCallback

from hf_scratchgpt import ScratchGPTForCausalLM
from hf_scratchgpt.data.instruction import (
    InstructionCollator,
    add_chat_template,
    instruction_splits,
    load_instruction_data,
    render_prompt,
    tokenize_instructions,
)
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
from hf_scratchgpt.judge import EndpointJudge, JudgeUnavailable, LocalJudge, judge_responses
from hf_scratchgpt.recipe import check_one_batch, check_vocabulary, finish_recipe, run_recipe, start_recipe
from hf_scratchgpt.responses import answer_instructions, score_responses
from hf_scratchgpt.training import LossPlotCallback, SampleGenerationCallback, ScratchGPTTrainer

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "instruct" / "book_chapter7.yaml"


@dataclass
class DataArguments:
    PATHS: ClassVar[dict] = {"train_file": "hub", "validation_file": "local", "test_file": "local",
                             "judge_model_path": "hub"}

    train_file: str | None = field(
        default=None, metadata={"help": "Entries: a JSON list or JSON Lines file, or a Hub dataset id."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Validation entries; replace the split."})
    test_file: str | None = field(default=None, metadata={"help": "Test entries to answer; replace the split."})
    max_length: int = field(default=1024, metadata={"help": "Tokens per example at most; longer ones are cut."})
    mask_prompt: bool = field(default=False, metadata={"help": "No loss on the prompt (the book's exercise 7.2)."})
    packing: bool = field(default=False, metadata={"help": "Several examples per row, apart (position_ids)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Tokens of each test answer at most."})
    judge_url: str | None = field(default=None, metadata={"help": "OpenAI-compatible endpoint of an LLM judge."})
    judge_model: str | None = field(default=None, metadata={"help": "The judge's model name at --judge_url."})
    judge_model_path: str | None = field(default=None, metadata={"help": "A local causal LM as judge instead."})

    def __post_init__(self):
        if not self.train_file:
            raise ValueError("pass --train_file: instruction entries (JSON, JSON Lines) or a Hub dataset id")
        if self.judge_url and not self.judge_model:
            raise ValueError("--judge_url needs --judge_model, the name of the model the endpoint serves")
        if self.judge_url and self.judge_model_path:
            raise ValueError("give --judge_url or --judge_model_path, not both")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be at least 1 (the test answers' tokens), got "
                             f"{self.max_new_tokens}")


def main(argv=None) -> dict:
    run = start_recipe("instruct", (FinetuningArguments, DataArguments), argv, default_config=DEFAULT_CONFIG)
    model_args, data_args = run.args
    run.training.remove_unused_columns = False  # the collator needs `prompt_length`

    splits = load_splits(data_args)
    check_one_batch(splits["train"], run.training, "entries")  # before the model loads and the data is tokenized
    tokenizer = add_chat_template(load_tokenizer(model_args))
    model = load_pretrained(ScratchGPTForCausalLM, model_args.model_name_or_path,
                            attn_implementation=run.common.attn_implementation, **config_overrides(model_args))
    check_vocabulary(tokenizer, model, model_args.model_name_or_path)
    max_length = min(data_args.max_length, model.config.context_length)
    features = {"validation": None}  # without validation entries: no validation loss
    for name in ("train", "validation") if len(splits["validation"]) else ("train",):
        features[name], cut = tokenize_instructions(splits[name], tokenizer, max_length=max_length)
        if cut and run.training.process_index == 0:
            print(f"instruct: {cut} of {len(splits[name])} {name} examples are longer than {max_length} tokens and "
                  "were cut (each keeps its end-of-text target)")
    model = select_trainable(model, model_args)
    if features["validation"] is None:
        run.training.eval_strategy = IntervalStrategy.NO
    if run.training.process_index == 0:
        print(f"instruct: {' / '.join(f'{len(s)} {n}' for n, s in splits.items())} entries; {trainable_summary(model)}")

    trainer = ScratchGPTTrainer(
        model=model,
        args=run.training,
        train_dataset=features["train"],
        eval_dataset=features["validation"],
        processing_class=tokenizer,
        data_collator=InstructionCollator(tokenizer.pad_token_id, mask_prompt=data_args.mask_prompt,
                                          packing=data_args.packing),
        callbacks=[
            SampleGenerationCallback(tokenizer, render_prompt(splits["train"][0]), max_new_tokens=60),
            LossPlotCallback(),
        ],
        card=dict(
            tags=["text-generation", "instruction-tuning"],
            base_model=model_args.model_name_or_path,
            datasets=[] if is_local_path(data_args.train_file) else [data_args.train_file],
            description="A ScratchGPT tuned to follow instructions (the book's chapter 7, Alpaca prompt format, "
            f"trainable: {model_args.trainable}) with `recipes/instruct.py` of hf_scratchgpt.",
        ),
    )
    if run.checkpoint is None and features["validation"] is not None:  # the validation loss before tuning
        trainer.add_callback(KeepInHistory(trainer.evaluate(metric_key_prefix="base")))
    metrics = finish_recipe(
        trainer,
        run,
        before_save=merge_adapters,
        after_evaluate=lambda trainer: {**before_tuning(trainer), **answer_and_score(trainer, splits["test"], data_args,
                                                                                    run)},
    )
    if trainer.is_world_process_zero():
        Path(run.training.output_dir, "metrics.json").write_text(json.dumps(metrics, indent=2))
        print_table(metrics)
    return metrics


def load_splits(data_args: DataArguments) -> dict:
    """The book's 85/10/5 split of one file; files given for validation or test replace the split."""
    data = load_instruction_data(data_args.train_file)
    if not (data_args.validation_file or data_args.test_file):
        return dict(instruction_splits(data))
    empty = data.select([])
    return {
        "train": data,
        "validation": load_instruction_data(data_args.validation_file) if data_args.validation_file else empty,
        "test": load_instruction_data(data_args.test_file) if data_args.test_file else empty,
    }


class KeepInHistory(TrainerCallback):
    """Puts metrics measured before training into the log history as training begins (`train()` starts a new one),
    so that each checkpoint keeps them for a resumed run."""

    def __init__(self, metrics: dict):
        self.metrics = metrics

    def on_train_begin(self, args, state, control, **kwargs):
        state.log_history.append({**self.metrics, "step": 0})


def before_tuning(trainer) -> dict:
    """The validation metrics before tuning (`base_*`), from the log history: this run's, or, resumed, the one its
    checkpoint kept."""
    found = {}
    for entry in trainer.state.log_history:
        found.update({name: value for name, value in entry.items() if name.startswith("base_")})
    return found


def _local_judge(path: str) -> LocalJudge:
    try:
        return LocalJudge(path, max_new_tokens=8)
    except (OSError, ValueError) as err:  # a folder that holds no model it can load: a judge that does not answer
        raise JudgeUnavailable(f"cannot load {path}: {str(err).strip().splitlines()[0]}") from err


def answer_and_score(trainer, test, data_args: DataArguments, run) -> dict:
    """Answer the test instructions into test-responses.json, score them, and ask the judge if there is one.

    The first process answers; the others wait for it at the end of `finish_recipe`.
    """
    if not trainer.is_world_process_zero() or len(test) == 0:
        return {}
    answered = answer_instructions(trainer.model, trainer.processing_class, list(test),
                                   max_new_tokens=data_args.max_new_tokens,
                                   batch_size=run.training.per_device_eval_batch_size)
    Path(run.training.output_dir, "test-responses.json").write_text(json.dumps(answered, indent=2))
    scores = {f"test_{name}": value for name, value in score_responses(answered).items()}
    if data_args.judge_url or data_args.judge_model_path:
        try:
            judge = (  # the reply is one integer: a few tokens (and a small judge's context holds them)
                EndpointJudge(data_args.judge_url, data_args.judge_model, max_tokens=8) if data_args.judge_url
                else _local_judge(data_args.judge_model_path)
            )
            judged = judge_responses(answered, judge)
            scores["test_judge_unparsed"] = judged["judge_unparsed"]  # replies without a score
            if judged["judge_mean_score"] is not None:
                scores["test_judge_mean_score"] = judged["judge_mean_score"]
        except JudgeUnavailable as err:  # the answers and the other scores are saved all the same
            print(f"instruct: judge skipped: {err}")
    return scores


def print_table(metrics: dict) -> None:
    rows = [(name, value) for name, value in metrics.items() if name.startswith(("base_loss", "eval_loss", "test_"))]
    print("\n| metric | value |\n| --- | ---: |")
    for name, value in rows:
        print(f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |")


if __name__ == "__main__":
    run_recipe(main)
