"""Chapter 7, instruction data: the book's split and its Alpaca prompt format."""

import json

import pytest

from hf_scratchgpt.data.instruction import format_instruction, instruction_splits, load_instruction_data


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def format_input(entry):
    """The book's chapter 7 prompt, as printed there."""
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


def test_alpaca_format_is_the_books(shared_data):
    path = shared_data / "instruction" / "instruction-data.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert any(entry["input"] for entry in data) and any(not entry["input"] for entry in data)
    for entry in data:
        assert format_instruction(entry, with_response=False) == format_input(entry)
        assert format_instruction(entry) == format_input(entry) + f"\n\n### Response:\n{entry['output']}"


def test_instruction_split_is_the_books(shared_data):
    path = shared_data / "instruction" / "instruction-data.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    splits = instruction_splits(load_instruction_data(path))
    train_portion = int(len(data) * 0.85)
    test_portion = int(len(data) * 0.1)
    assert splits["train"].to_list() == data[:train_portion]
    assert splits["test"].to_list() == data[train_portion : train_portion + test_portion]
    assert splits["validation"].to_list() == data[train_portion + test_portion :]


def test_instruction_entry_without_a_field_is_named(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(ValueError, match="entry 1") as error:
        load_instruction_data(path)
    one_line(error)
