"""Loading, in every chapter: one rule that tells a local file or folder from a Hugging Face Hub id.

Models, tokenizers and data sets are named the same way on the command line and in code: a path on this machine
or a Hub id (`openai-community/gpt2`). A name is local when it exists here, is written as a path (it starts with
`.`, `/` or `~`), or ends like a data file (`.txt`, `.json`, ...); anything else is a Hub id. So a typo in a
path is reported as a missing file, not sent to the Hub as an id.
"""

import os
import sys
from pathlib import Path


# A name with one of these endings names a file (missing or not), never a Hub repository.
FILE_SUFFIXES = (".txt", ".text", ".md", ".rst", ".tsv", ".csv", ".json", ".jsonl", ".parquet")


def is_local_path(name: str | os.PathLike) -> bool:
    """True when `name` means a file or folder on this machine, False when it is a Hub id."""
    if isinstance(name, os.PathLike):
        return True
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.lower().endswith(FILE_SUFFIXES)


def check_local_path(flag: str, name: str | os.PathLike | None) -> None:
    """A local `name` must exist; `flag` (such as `--model_name_or_path`) says where it came from in the error."""
    if name and is_local_path(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"{flag} {name}: no such file or folder")


def check_model_folder(prog: str, name: str) -> None:
    """Exit with one line when a local `name` is not a folder holding a model (a config.json)."""
    if not is_local_path(name):
        return  # a Hub id
    folder = os.path.expanduser(name)
    if not os.path.isdir(folder):
        sys.exit(f"{prog}: error: no model folder {name}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        sys.exit(f"{prog}: error: {name} holds no model (no config.json)")


__all__ = ["FILE_SUFFIXES", "check_local_path", "check_model_folder", "is_local_path"]

