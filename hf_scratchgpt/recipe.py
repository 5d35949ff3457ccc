"""Chapters 5 to 7, the recipes: the skeleton that pretraining, classification and instruction tuning share.

A recipe is only its own steps between a common start and a common ending:

    run = start_recipe("pretrain", (ModelArguments, DataArguments), argv, default_config=DEFAULT_CONFIG)
    ...  # data, tokenizer, model: built after start_recipe seeded, so --seed decides the starting weights
    trainer = ScratchGPTTrainer(model=model, args=run.training, ...)
    metrics = finish_recipe(trainer, run)

- `start_recipe` reads typed arguments (the recipe's dataclasses, `RecipeArguments` and transformers'
  `TrainingArguments`) from an optional YAML file and command-line flags, then does every check that needs no
  work: paths that must exist, the output folder, the checkpoint to resume from. Then it seeds, as the book does
  before building a model.
- `finish_recipe` is the common ending: train (resumable) -> save -> log and save metrics -> evaluate (and test)
  -> save state -> model card (with `--space_app`, app.py and a Space's settings) -> push to the Hub.
- `run_recipe(main)` runs a recipe's `main`: bad input becomes one line on stderr and exit status 2.

YAML files come in sections (`model:`, `data:`, `training:`), which are flattened; an unknown key or flag is an
error that names it. Flags win over the file.
"""

import dataclasses
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed
from transformers.integrations import is_tensorboard_available

from .hub import check_local_path


@dataclass
class RecipeArguments:
    """What every recipe takes besides its own arguments and `TrainingArguments`."""

    attn_implementation: str = field(
        default="sdpa", metadata={"help": "eager (the book's math written out) or sdpa (PyTorch's fused kernel)."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Write over a model in output_dir, or delete an unfinished run's checkpoints."}
    )
    tensorboard: bool = field(default=True, metadata={"help": "Log to TensorBoard when it is installed."})
    space_app: bool = field(
        default=False,
        metadata={"help": "Also make output_dir a Hugging Face Space: app.py (the model's Gradio page), "
                          "requirements.txt and the Space's settings in the model card; --push_to_hub uploads them."},
    )


@dataclass
class RecipeRun:
    """A recipe's parsed arguments and what `start_recipe` found out before any work."""

    args: tuple  # the recipe's own argument dataclasses, in the order it gave them
    common: RecipeArguments
    training: TrainingArguments
    checkpoint: str | None  # the checkpoint folder to resume from, or None
    given: frozenset[str]  # the settings the user chose, by flag or in a --config file (not the recipe's defaults)


def start_recipe(
    name: str, arg_types: Sequence[type], argv: Sequence[str] | None = None, *, default_config=None
) -> RecipeRun:
    """Parse and check a recipe's arguments, then seed: everything a recipe does before its own work.

    The paths each dataclass lists in its `PATHS` class variable are checked (see `check_paths`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    *own, common, training = parse_recipe_args(
        (*arg_types, RecipeArguments, TrainingArguments),
        argv,
        default_config=default_config,
        # On a machine with no accelerator, this also makes several processes one DDP group over gloo.
        defaults=dict(use_cpu=not torch.accelerator.is_available(), ddp_find_unused_parameters=False),
    )
    print(f"{name}: process {training.process_index} of world size {training.world_size}")
    for args in own:
        check_paths(args)
    check_output_dir(training, common.overwrite_output_dir)
    checkpoint = resolve_checkpoint(training)
    if common.overwrite_output_dir:
        _remove_old_checkpoints(training)
    if common.tensorboard and training.report_to in ([], ["none"], "none") and is_tensorboard_available():
        training.report_to = ["tensorboard"]
    set_seed(training.seed)  # before any model is built: the same seed, the same starting weights
    known = {f.name for cls in (*arg_types, RecipeArguments, TrainingArguments) for f in dataclasses.fields(cls)}
    return RecipeRun(tuple(own), common, training, checkpoint, given_settings(argv, known))


def finish_recipe(
    trainer: Trainer,
    run: RecipeRun,
    *,
    test_dataset=None,
    before_save: Callable[[Trainer], None] | None = None,
    after_evaluate: Callable[[Trainer], dict] | None = None,
) -> dict:
    """The common ending: train (from `run.checkpoint` if any), save, evaluate, write the card, push.

    `before_save(trainer)` runs between training and saving (the LoRA recipes merge their adapters there).
    `after_evaluate(trainer)` returns more metrics (instruction tuning scores its answers there), saved and put on
    the model card with the others. Returns the evaluation metrics, with `test_*` ones when a `test_dataset` is
    given.
    """
    if run.common.space_app:
        trainer.card["space_app"] = True  # wherever the card is written: here, and again by push_to_hub
    try:
        train_result = trainer.train(resume_from_checkpoint=run.checkpoint)
    except (RuntimeError, ValueError) as err:  # torch's words for weights or optimizer state of another model
        mismatch = ("loading state_dict", "parameter group", "size mismatch")
        if run.checkpoint is None or not any(words in str(err) for words in mismatch):
            raise
        raise ValueError(f"--resume_from_checkpoint {run.checkpoint} holds the state of another model or recipe "
                         f"({str(err).strip().splitlines()[0]}): resume with the settings of its own run") from err
    if before_save is not None:
        before_save(trainer)
    trainer.save_model()  # weights, config with auto_map, code files, tokenizer, generation config
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    metrics = final_evaluation(trainer) if trainer.eval_dataset is not None else {}
    if test_dataset is not None:
        metrics.update(trainer.evaluate(test_dataset, metric_key_prefix="test"))
    if after_evaluate is not None:
        more = after_evaluate(trainer)
        if more:
            trainer.log(more)  # into the log history, which the model card reads
            metrics.update(more)
    if metrics:
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        trainer.create_model_card()
    if run.training.push_to_hub:
        trainer.push_to_hub()
    return metrics


def final_evaluation(trainer: Trainer) -> dict:
    """The metrics of the trained model: those of the evaluation `Trainer` ran at its last step, if it did (it does
    with eval_strategy "steps" since transformers 5, and "epoch" when training ends with an epoch), else of a new
    one. The validation data is evaluated once. With `load_best_model_at_end` the model is another: evaluated anew."""
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    ran_at_end = evaluations and evaluations[-1].get("step") == trainer.state.global_step
    if ran_at_end and not trainer.args.load_best_model_at_end:
        return {name: value for name, value in evaluations[-1].items() if name != "step"}
    return trainer.evaluate()


def run_recipe(main: Callable[[], object]) -> None:
    """Run a recipe's `main`; bad input (ValueError, OSError) becomes one line and exit status 2.

    Set `HF_SCRATCHGPT_TRACEBACK=1` to see the whole traceback instead. Under `torchrun` or `accelerate launch`
    the process group is destroyed before the interpreter exits: gloo's worker threads otherwise can abort the
    process (SIGABRT, "terminate called without an active exception") after a run that succeeded.
    """
    try:
        main()
    except (ValueError, OSError) as err:  # OSError: files, and models or tokenizers the Hub cannot give
        if os.environ.get("HF_SCRATCHGPT_TRACEBACK") == "1":
            raise
        lines = str(err).strip().splitlines() or [type(err).__name__]
        print(f"error: {lines[0]}", file=sys.stderr)
        sys.exit(2)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# Arguments: the recipe's defaults, then a YAML file, then flags


def parse_recipe_args(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, default_config=None, defaults=None
):
    """Instances of `dataclass_types` from, by rising precedence: the recipe's `defaults`, `--config FILE` (or
    `default_config` when no `--config` is given), and the flags in `argv` (default `sys.argv[1:]`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = _pop_option(argv, "--config")
    config_path = config_path or default_config
    parser = HfArgumentParser(dataclass_types)
    parser.set_defaults(**(defaults or {}))
    if config_path is not None:
        fields = [f for cls in dataclass_types for f in dataclasses.fields(cls)]
        settings = read_config(config_path, {f.name for f in fields})
        for f in fields:  # `train_file: a.txt` for a list field: a list of one, as the flag would make it
            if isinstance(settings.get(f.name), str) and str(f.type).startswith(("list", "typing.List")):
                settings[f.name] = [settings[f.name]]
        parser.set_defaults(**settings)
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        raise ValueError(f"unknown option(s): {' '.join(remaining)}")
    return tuple(parsed)


def read_config(path, known: set[str]) -> dict:
    """A recipe YAML file as one flat dict; a key that no argument has is an error naming it and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ValueError(f"{path}: {where}not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(content).__name__}")
    flat = {}
    for key, value in content.items():
        if isinstance(value, dict) and key not in known:  # a section
            for inner, inner_value in value.items():
                flat[inner] = (f"{key}.{inner}", inner_value)
        else:
            flat[key] = (key, value)
    unknown = [where for name, (where, _) in flat.items() if name not in known]
    if unknown:
        raise ValueError(f"{path}: unknown config key(s): {', '.join(unknown)}")
    return {name: value for name, (_, value) in flat.items()}


def given_settings(argv: Sequence[str], known: set[str]) -> frozenset[str]:
    """The settings named by the flags in `argv` and by the keys of its `--config` file, if any."""
    config_path, argv = _pop_option(list(argv), "--config")
    given = set(read_config(config_path, known)) if config_path else set()
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            given.add(name if name in known else name.removeprefix("no_"))  # --no_tensorboard sets tensorboard
    return frozenset(given)


def _pop_option(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    for i, arg in enumerate(argv):
        if arg == flag:
            if i + 1 >= len(argv):
                raise ValueError(f"{flag} needs a value")
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, argv


# ----------------------------------------------------------------------------------------------------------
# Checks before any work


def check_paths(args) -> None:
    """Every path that a dataclass of arguments names in its `PATHS` must exist, checked before any work.

    `PATHS` maps a field to "local" (a file or folder that must exist) or "hub" (a local path that must exist, or
    a Hub id; see `hf_scratchgpt.hub`). A field may hold a list of them.
    """
    for name, kind in getattr(args, "PATHS", {}).items():
        value = getattr(args, name)
        for path in value if isinstance(value, (list, tuple)) else [value] if value else []:
            if kind == "hub":
                check_local_path(f"--{name}", path)
            elif not Path(path).expanduser().exists():
                raise FileNotFoundError(f"--{name} {path}: no such file or folder")


def check_output_dir(training_args: TrainingArguments, overwrite: bool) -> None:
    """Refuse to write over a model already saved in output_dir, unless resuming or told to."""
    output_dir = Path(training_args.output_dir)
    if training_args.resume_from_checkpoint or overwrite:
        return
    if (output_dir / "config.json").exists():
        raise ValueError(
            f"output_dir {output_dir} already holds a model (config.json): pass --overwrite_output_dir to replace it, "
            "--resume_from_checkpoint to continue its run, or choose another --output_dir"
        )
    if _checkpoints(str(output_dir)):  # a run stopped before its end: starting over would write over them
        last = _last_complete_checkpoint(str(output_dir))
        resume = f"({Path(last).name}): pass --resume_from_checkpoint last to continue it, " if last else (
            "(none saved whole, nothing to resume): pass ")
        raise ValueError(
            f"output_dir {output_dir} holds the checkpoints of a run that did not finish {resume}"
            "--overwrite_output_dir to start over (its checkpoints are then deleted), or choose another --output_dir"
        )


def _remove_old_checkpoints(training_args: TrainingArguments) -> None:
    """With --overwrite_output_dir, the main process deletes the checkpoints an earlier run left in output_dir: a
    later `--resume_from_checkpoint last` must find this run's, not one of those."""
    if training_args.resume_from_checkpoint or training_args.process_index != 0:
        return
    old = _checkpoints(training_args.output_dir)
    for name in old:
        shutil.rmtree(os.path.join(training_args.output_dir, name))
    if old:
        print(f"removed the {len(old)} checkpoint(s) of the earlier run in {training_args.output_dir}")


def resolve_checkpoint(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint` as a folder: a path as given, or `last` (also `true`) for output_dir's newest."""
    wanted = training_args.resume_from_checkpoint
    if wanted is None:
        return None
    if str(wanted).lower() in ("last", "latest", "true"):
        last = _last_complete_checkpoint(training_args.output_dir)
        if last is None:
            saved = "none saved whole" if _checkpoints(training_args.output_dir) else "no checkpoint-* folder"
            raise ValueError(f"--resume_from_checkpoint {wanted}: {saved} in {training_args.output_dir}")
        wanted = last
    elif not os.path.isdir(wanted):
        raise FileNotFoundError(f"--resume_from_checkpoint {wanted} is not a folder")
    if not os.path.isfile(os.path.join(wanted, TRAINER_STATE)):
        raise ValueError(f"--resume_from_checkpoint {wanted} is not a checkpoint: it has no trainer_state.json, which "
                         "each checkpoint-* folder of a run holds")
    return wanted


TRAINER_STATE = "trainer_state.json"  # in every checkpoint Trainer saved whole


def _checkpoints(folder: str) -> list[str]:
    """The checkpoint-* folders of `folder`, by step."""
    if not os.path.isdir(folder):
        return []
    steps = [(int(match.group(1)), name) for name in os.listdir(folder)
             if (match := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(folder, name))]
    return [name for _, name in sorted(steps)]


def _last_complete_checkpoint(folder: str) -> str | None:
    """The checkpoint-* folder of `folder` with the highest step that was saved whole (its trainer_state.json is
    there: a crash while saving leaves one without), or None."""
    complete = [name for name in _checkpoints(folder) if os.path.isfile(os.path.join(folder, name, TRAINER_STATE))]
    return os.path.join(folder, complete[-1]) if complete else None


def check_one_batch(train, training_args: TrainingArguments, examples: str, smaller: str | None = None) -> None:
    """The training split must fill one batch on every process: checked before any work, in every recipe.

    `examples` names what the rows are ("windows of 128 tokens"); `smaller`, a flag that makes more of them.
    """
    batch = training_args.per_device_train_batch_size * training_args.world_size
    if len(train) < batch:
        flags = f"{smaller} or --per_device_train_batch_size" if smaller else "--per_device_train_batch_size"
        raise ValueError(
            f"the training data gives {len(train)} {examples}, fewer than one batch of {batch}: use more data or a "
            f"smaller {flags}"
        )


def check_enough_data(splits, training_args: TrainingArguments, examples: str, smaller: str) -> None:
    """The training split must fill one batch on every process, and the validation split hold an example.

    `examples` names what the rows are ("windows of 128 tokens"); `smaller` is the flag that makes more of them.
    """
    check_one_batch(splits["train"], training_args, examples, smaller)
    if len(splits["validation"]) == 0:
        raise ValueError(f"the validation data gives no {examples.split()[0]}: raise --validation_fraction")


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, model, where: str) -> None:
    """A tokenizer must not make ids the model has no embedding for."""
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens, more than the vocabulary of {where} "
            f"({model.config.vocab_size}): use the model's own tokenizer (leave out --tokenizer)"
        )


__all__ = [
    "RecipeArguments",
    "RecipeRun",
    "check_enough_data",
    "check_one_batch",
    "check_output_dir",
    "check_paths",
    "check_vocabulary",
    "final_evaluation",
    "finish_recipe",
    "given_settings",
    "parse_recipe_args",
    "read_config",
    "resolve_checkpoint",
    "run_recipe",
    "start_recipe",
]
