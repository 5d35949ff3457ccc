"""Chapter 7, instruction data: the book's JSON entries, its train/test/validation split, and the Alpaca prompt.

Each entry has an `instruction`, an optional `input` (empty string when absent) and the `output` to learn;
`format_instruction` writes it in the Alpaca prompt format that the book uses.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path

from datasets import Dataset, DatasetDict


__all__ = ["INSTRUCTION_KEYS", "load_instruction_data", "instruction_splits", "format_instruction"]

INSTRUCTION_KEYS = ("instruction", "input", "output")


def load_instruction_data(path: str | os.PathLike) -> Dataset:
    """The book's instruction data: a JSON list of `{"instruction", "input", "output"}` entries."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data file not found: {path}")
    entries = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of entries")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or any(not isinstance(entry.get(key), str) for key in INSTRUCTION_KEYS):
            raise ValueError(f"{path}, entry {index}: expected string fields {list(INSTRUCTION_KEYS)}")
    return Dataset.from_list([{key: entry[key] for key in INSTRUCTION_KEYS} for entry in entries])


def instruction_splits(dataset: Dataset) -> DatasetDict:
    """The book's chapter 7 split, in file order: 85% train, 10% test, the remaining 5% validation."""
    train_end = int(len(dataset) * 0.85)
    test_end = train_end + int(len(dataset) * 0.1)
    return DatasetDict(
        train=dataset.select(range(train_end)),
        test=dataset.select(range(train_end, test_end)),
        validation=dataset.select(range(test_end, len(dataset))),
    )


def format_instruction(entry: Mapping[str, str], *, with_response: bool = True) -> str:
    """An entry in the Alpaca prompt format of the book's chapter 7.

    `with_response=False` gives the book's `format_input(entry)`, the prompt a model answers; the default
    appends `"\\n\\n### Response:\\n" + output`, the full text of a training example.
    """
    text = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    if entry["input"]:
        text += f"\n\n### Input:\n{entry['input']}"
    if with_response:
        text += f"\n\n### Response:\n{entry['output']}"
    return text
