"""Stage 6, running the recipes: typed arguments from an optional YAML file and command-line flags.

A recipe declares dataclasses (its own, plus transformers' `TrainingArguments`); `parse_recipe_args` fills them
from `--config file.yaml` (sections such as `model:`, `data:`, `training:` are flattened) and then from flags,
which win over the file. An unknown key in the file or an unknown flag is an error that names it, raised before
anything runs; `run_recipe` turns such errors into one line on stderr and exit status 2.
"""

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint


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
        known = {field.name for cls in dataclass_types for field in dataclasses.fields(cls)}
        parser.set_defaults(**read_config(config_path, known))
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        raise ValueError(f"unknown option(s): {' '.join(remaining)}")
    return tuple(parsed)


def read_config(path, known: set[str]) -> dict:
    """A recipe YAML file as one flat dict; a key that no argument has is an error naming it and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    content = yaml.safe_load(path.read_text()) or {}
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


def _pop_option(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    for i, arg in enumerate(argv):
        if arg == flag:
            if i + 1 >= len(argv):
                raise ValueError(f"{flag} needs a value")
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, argv


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


def check_local_path(flag: str, value: str) -> None:
    """A value written as a path (./, /, ~, ../) must exist; anything else may be a Hub id."""
    if str(value).startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(value)):
        raise FileNotFoundError(f"{flag} {value}: no such file or folder")


def check_output_dir(training_args, overwrite: bool) -> None:
    """Refuse to write over a model already saved in output_dir, unless resuming or told to."""
    output_dir = Path(training_args.output_dir)
    if training_args.resume_from_checkpoint or overwrite or not (output_dir / "config.json").exists():
        return
    raise ValueError(
        f"output_dir {output_dir} already holds a model (config.json): pass --overwrite_output_dir to replace it, "
        "--resume_from_checkpoint to continue its run, or choose another --output_dir"
    )


def resolve_checkpoint(training_args) -> str | None:
    """`--resume_from_checkpoint` as a folder: a path as given, or `last` (also `true`) for output_dir's newest."""
    wanted = training_args.resume_from_checkpoint
    if wanted is None:
        return None
    if str(wanted).lower() in ("last", "latest", "true"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise ValueError(f"--resume_from_checkpoint {wanted}: no checkpoint-* folder in {training_args.output_dir}")
        return last
    if not os.path.isdir(wanted):
        raise FileNotFoundError(f"--resume_from_checkpoint {wanted} is not a folder")
    return wanted


__all__ = ["check_local_path", "check_output_dir", "parse_recipe_args", "read_config", "resolve_checkpoint", "run_recipe"]
