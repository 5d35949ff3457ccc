"""Chapter 7, instruction data: loading, the book's split, the Alpaca prompt and its chat template, token ids,
and the collator."""

import json
from unittest import mock

import pytest
import torch
from datasets import Dataset
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer
from transformers.masking_utils import find_packed_sequence_indices

import hf_scratchgpt.data.instruction as instruction
from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM
from hf_scratchgpt.data.instruction import (
    CHAT_TEMPLATE,
    InstructionCollator,
    add_chat_template,
    format_instruction,
    instruction_splits,
    load_instruction_data,
    render_prompt,
    response_text,
    to_messages,
    tokenize_instructions,
)
from hf_scratchgpt.tokenization import gpt2_tokenizer


EOS = 50256  # GPT-2's <|endoftext|>, its padding token in the book's chapter 7 too


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


def custom_collate_fn(batch, pad_token_id=50256, ignore_index=-100):
    """The book's chapter 7 collate function (without its device and allowed_max_length arguments)."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy()
        new_item += [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


@pytest.fixture(scope="module")
def book_data(shared_data) -> list[dict]:
    return json.loads((shared_data / "instruction" / "instruction-data.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def chat_gpt2(shared_data):
    """GPT-2's tokenizer with the Alpaca chat template: a tokenizer of its own, the session's `gpt2` has none."""
    return add_chat_template(gpt2_tokenizer(shared_data / "gpt2" / "encoder.json", shared_data / "gpt2" / "vocab.bpe"))


# ----------------------------------------------------------------------------------------------------------
# The book's prompt and split


def test_alpaca_format_is_the_books(book_data):
    assert any(entry["input"] for entry in book_data) and any(not entry["input"] for entry in book_data)
    for entry in book_data:
        assert format_instruction(entry, with_response=False) == format_input(entry)
        assert format_instruction(entry) == format_input(entry) + f"\n\n### Response:\n{entry['output']}"
        assert render_prompt(entry) == format_input(entry) + "\n\n### Response:\n"
        assert response_text(entry) == entry["output"]


def test_instruction_split_is_the_books(shared_data, book_data):
    splits = instruction_splits(load_instruction_data(shared_data / "instruction" / "instruction-data.json"))
    assert [len(splits[name]) for name in ("train", "test", "validation")] == [935, 110, 55]
    assert splits["train"].to_list() == book_data[:935]
    assert splits["test"].to_list() == book_data[935:1045]
    assert splits["validation"].to_list() == book_data[1045:]


# ----------------------------------------------------------------------------------------------------------
# Loading


ALPACA = [
    {"instruction": "Add 2 and 3.", "output": "5"},  # no input: read as ""
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
]
CHAT = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
]
ALPACA_LOADED = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}, ALPACA[1]]


def test_json_jsonl_and_list_load_the_same_alpaca_entries(tmp_path):
    json_file, jsonl_file = tmp_path / "data.json", tmp_path / "data.jsonl"
    json_file.write_text(json.dumps(ALPACA))
    jsonl_file.write_text("\n".join(json.dumps(entry) for entry in ALPACA) + "\n\n")  # blank lines hold nothing
    with_nulls = Dataset.from_dict({"instruction": ["Add 2 and 3.", "Translate to French."], "input": [None, "cat"]})
    with_nulls = with_nulls.add_column("output", ["5", "chat"])
    for source in (json_file, str(jsonl_file), ALPACA, with_nulls):
        dataset = load_instruction_data(source)
        assert sorted(dataset.column_names) == ["input", "instruction", "output"]
        assert dataset.to_list() == ALPACA_LOADED


def test_chat_entries_keep_their_messages(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(entry) for entry in CHAT))
    for source in (path, CHAT):
        dataset = load_instruction_data(source)
        assert dataset.column_names == ["messages"]
        assert [to_messages(entry) for entry in dataset] == [entry["messages"] for entry in CHAT]


def test_other_fields_are_kept_even_when_the_first_entry_lacks_them():
    entries = [ALPACA[0], {**ALPACA[1], "id": 7}]
    assert load_instruction_data(entries)["id"] == [None, 7]


def test_hub_id_loads_the_split(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return Dataset.from_list([{"instruction": "a", "output": "b"}])  # no input column on this Hub dataset

    monkeypatch.setattr(instruction, "load_dataset", fake_load_dataset)
    dataset = load_instruction_data("someone/alpaca-like", split="test")
    assert calls == [("someone/alpaca-like", "test")]
    assert dataset.to_list() == [{"instruction": "a", "output": "b", "input": ""}]


def test_instruction_entry_without_a_field_is_named(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(ValueError, match="entry 1") as error:
        load_instruction_data(path)
    one_line(error)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_instruction_data(tmp_path / "missing.json")


def _turns(*roles):
    return {"messages": [{"role": role, "content": "x"} for role in roles]}


@pytest.mark.parametrize(
    "entries, expected",
    [
        ([ALPACA[1], {"instruction": "c", "input": ""}], "entry 1: missing 'output'"),
        ([{"input": "", "output": "b"}], "entry 0: missing 'instruction'"),
        ([ALPACA[1], {"instruction": "c", "input": 3, "output": "d"}], "entry 1: 'input' must be a string, not int"),
        ([ALPACA[1], ["a", "b"]], "entry 1: expected an object (a dict), got list"),
        ([{"text": "a"}], "entry 0: expected an Alpaca entry (instruction, input, output) or a chat entry"),
        ([ALPACA[1], CHAT[0]], "entry 1: a chat entry among alpaca entries"),
        ([CHAT[0], CHAT[1], _turns("user"), CHAT[0]], "entry 2: the conversation ends with a user turn"),
        (
            [CHAT[0], CHAT[0], CHAT[0], _turns("user", "robot", "assistant")],
            "entry 3, turn 1: unknown role 'robot'; expected system, user or assistant",
        ),
        ([_turns("user", "system", "assistant")], "entry 0, turn 1: a system turn can only be the first one"),
        ([{"messages": [{"role": "user"}, _turns("assistant")["messages"][0]]}], "entry 0, turn 0: missing 'content'"),
        ([{"messages": []}], "entry 0: 'messages' must be a non-empty list of turns"),
    ],
)
def test_bad_entries_are_named_in_one_line(tmp_path, entries, expected):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError) as error:
        load_instruction_data(path)
    assert one_line(error).startswith(f"{path}, {expected}")
    with pytest.raises(ValueError) as error:  # the same entries given as a list: no file to name
        load_instruction_data(entries)
    assert one_line(error).startswith(expected)


def test_an_extra_field_of_two_types_is_named_with_its_entries(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{**ALPACA[0], "id": 1}, {**ALPACA[1], "id": "x2"}]))
    with pytest.raises(ValueError) as error:
        load_instruction_data(path)
    message = one_line(error)
    assert message.startswith(f"the field 'id' holds values of more than one type (int ({path}, entry 0) and str "
                              f"({path}, entry 1);")
    path.write_text(json.dumps([{**ALPACA[0], "tags": [1, 2]}, {**ALPACA[1], "tags": ["x"]}]))  # lists of two kinds
    with pytest.raises(ValueError) as error:
        load_instruction_data(path)
    assert one_line(error).startswith(f"the field 'tags' holds values of more than one type (list of another kind "
                                      f"({path}, entry 1);")
    path.write_text(json.dumps([{**ALPACA[0], "id": 1}, {**ALPACA[1], "id": 2}]))  # one type: kept as given
    assert load_instruction_data(path)["id"] == [1, 2]


def test_bad_jsonl_entry_names_entry_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ALPACA[1]) + "\n\n" + json.dumps({"instruction": "a", "input": ""}) + "\n")
    with pytest.raises(ValueError) as error:
        load_instruction_data(path)
    assert one_line(error) == f"{path}, entry 1 (line 3): missing 'output'"


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("empty.json", "  \n", "the file is empty"),
        ("empty.jsonl", "", "the file is empty"),
        ("empty_list.json", "[]", "no instruction entries: the list is empty"),
        ("object.json", '{"instruction": "a"}', "expected a JSON list of entries, got dict"),
        ("broken.json", '[{"instruction": "a",\n "output": }]', "invalid JSON at line 2, column 12"),
        ("broken.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n', "line 2: invalid JSON"),
    ],
)
def test_bad_files_are_named_in_one_line(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        load_instruction_data(path)
    message = one_line(error)
    assert message.startswith(str(path)) and expected in message


def test_empty_list_and_dataset_are_refused():
    with pytest.raises(ValueError, match="the list is empty") as error:
        load_instruction_data([])
    one_line(error)
    with pytest.raises(ValueError, match="has no rows") as error:
        load_instruction_data(Dataset.from_dict({"instruction": [], "output": []}))
    one_line(error)


# ----------------------------------------------------------------------------------------------------------
# The chat template against the Python prompt


def test_chat_template_gives_the_python_prompt_ids_on_all_book_entries(book_data, chat_gpt2):
    """For every entry: the template's generation prompt is `render_prompt`'s ids, the whole conversation is
    tokenize_instructions' ids, and the assistant mask marks exactly the response and its eos."""
    tokenized, num_cut = tokenize_instructions(Dataset.from_list(book_data), chat_gpt2)
    assert num_cut == 0
    with_input = 0
    for entry, example in zip(book_data, tokenized):
        messages = to_messages(entry)
        prompt = chat_gpt2.apply_chat_template(messages[:-1], add_generation_prompt=True)  # a BatchEncoding
        prompt_ids = chat_gpt2(render_prompt(entry), add_special_tokens=False).input_ids
        assert prompt["input_ids"] == prompt_ids
        full = chat_gpt2.apply_chat_template(messages, return_assistant_tokens_mask=True)
        assert full["input_ids"] == example["input_ids"]
        assert example["prompt_length"] == len(prompt_ids)
        num_response = len(example["input_ids"]) - len(prompt_ids)  # response and eos
        assert full["assistant_masks"] == [0] * len(prompt_ids) + [1] * num_response
        with_input += bool(entry["input"])
    assert 0 < with_input < len(book_data)  # entries with and without an input section were both compared


def test_chat_template_renders_the_books_text(book_data, chat_gpt2):
    entry = next(entry for entry in book_data if entry["input"])
    text = chat_gpt2.apply_chat_template(to_messages(entry), tokenize=False)
    assert text == format_instruction(entry) + "<|endoftext|>"


def test_system_message_replaces_the_preamble(chat_gpt2):
    messages = CHAT[1]["messages"]
    text = chat_gpt2.apply_chat_template(messages, tokenize=False)
    assert text == "Answer briefly.\n\n### Instruction:\n2+2?\n\n### Response:\n4<|endoftext|>"
    assert render_prompt(CHAT[1]) == "Answer briefly.\n\n### Instruction:\n2+2?\n\n### Response:\n"
    assert chat_gpt2.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True) == render_prompt(
        CHAT[1]
    )


def test_multi_turn_conversation(chat_gpt2):
    entry = {
        "messages": [
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one."},
            {"role": "assistant", "content": "Red."},
        ]
    }
    expected_prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a color.\n\n### Response:\nBlue.<|endoftext|>"
        "\n\n### Instruction:\nAnother one.\n\n### Response:\n"
    )
    assert render_prompt(entry) == expected_prompt
    assert response_text(entry) == "Red."
    full = chat_gpt2.apply_chat_template(entry["messages"], return_assistant_tokens_mask=True)
    assert chat_gpt2.decode(full["input_ids"]) == expected_prompt + "Red.<|endoftext|>"
    # The template marks both answers; tokenize_instructions learns the last one only (the earlier is prompt).
    assert chat_gpt2.decode([i for i, m in zip(full["input_ids"], full["assistant_masks"]) if m]) == (
        "Blue.<|endoftext|>Red.<|endoftext|>"
    )
    (example,), _ = tokenize_instructions(Dataset.from_list([entry]), chat_gpt2)
    assert example["input_ids"] == full["input_ids"]
    assert chat_gpt2.decode(example["input_ids"][example["prompt_length"] :]) == "Red.<|endoftext|>"


def test_template_refuses_a_role_it_cannot_render(chat_gpt2):
    with pytest.raises(TemplateError, match="robot"):
        chat_gpt2.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_chat_template_is_saved_with_the_tokenizer(chat_gpt2, tmp_path):
    chat_gpt2.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.apply_chat_template(CHAT[0]["messages"], tokenize=False) == chat_gpt2.apply_chat_template(
        CHAT[0]["messages"], tokenize=False
    )


# ----------------------------------------------------------------------------------------------------------
# Token ids


def test_prompt_length_is_the_prompt_boundary(book_data, gpt2):
    tokenized, _ = tokenize_instructions(Dataset.from_list(book_data[:50]), gpt2)
    assert tokenized.column_names == ["input_ids", "prompt_length"]
    for entry, example in zip(book_data, tokenized):
        ids, boundary = example["input_ids"], example["prompt_length"]
        assert gpt2.decode(ids[:boundary]) == render_prompt(entry)
        assert gpt2.decode(ids[boundary:-1]) == entry["output"] and ids[-1] == EOS
        # The book tokenizes prompt and response as one text: the same ids.
        assert ids[:-1] == gpt2(format_instruction(entry), add_special_tokens=False).input_ids


def test_truncation_keeps_the_final_eos_and_counts_cut_examples(book_data, gpt2):
    data = Dataset.from_list(book_data[:40])
    full, num_cut = tokenize_instructions(data, gpt2)
    assert num_cut == 0
    lengths = sorted(len(ids) for ids in full["input_ids"])
    max_length = lengths[len(lengths) // 2]  # about half the examples are longer
    cut, num_cut = tokenize_instructions(data, gpt2, max_length=max_length)
    assert num_cut == sum(length > max_length for length in lengths) > 0
    for whole, short in zip(full, cut):
        if len(whole["input_ids"]) <= max_length:
            assert short == whole
        else:
            assert short["input_ids"] == whole["input_ids"][: max_length - 1] + [EOS]
            assert short["prompt_length"] == min(whole["prompt_length"], max_length - 1)


def test_a_prompt_longer_than_max_length_is_cut_too(gpt2):
    entry = {"instruction": "word " * 40, "input": "", "output": "Yes."}
    (example,), num_cut = tokenize_instructions(Dataset.from_list([entry]), gpt2, max_length=20)
    assert num_cut == 1
    assert len(example["input_ids"]) == 20 and example["input_ids"][-1] == EOS
    assert example["prompt_length"] == 19
    assert example["input_ids"][:19] == gpt2(render_prompt(entry), add_special_tokens=False).input_ids[:19]


def test_max_length_below_two_is_refused(gpt2):
    with pytest.raises(ValueError, match="max_length must be an integer of at least 2"):
        tokenize_instructions(Dataset.from_list(ALPACA), gpt2, max_length=1)


# ----------------------------------------------------------------------------------------------------------
# The collator

# prompt 1 2 | response 3 4 | eos; prompt 5 | response 6 | eos
FEATURES = [{"input_ids": [1, 2, 3, 4, EOS], "prompt_length": 2}, {"input_ids": [5, 6, EOS], "prompt_length": 1}]
X = -100


def test_collator_pads_and_keeps_the_first_eos_as_target():
    batch = InstructionCollator(EOS)(FEATURES)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, EOS], [5, 6, EOS, EOS, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3, 4, EOS], [5, 6, EOS, X, X]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def test_collator_with_mask_prompt_learns_only_responses():
    batch = InstructionCollator(EOS, mask_prompt=True)(FEATURES)
    assert batch["labels"].tolist() == [[X, X, 3, 4, EOS], [X, 6, EOS, X, X]]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, EOS], [5, 6, EOS, EOS, EOS]]


def test_collator_is_the_books_custom_collate_fn_unshifted(book_data, gpt2):
    """The book shifts in its collate function, the model here shifts the labels: the same inputs and targets."""
    tokenized, _ = tokenize_instructions(Dataset.from_list(book_data[:8]), gpt2)
    batch = InstructionCollator(EOS)(list(tokenized))
    book_inputs, book_targets = custom_collate_fn(
        [gpt2(format_instruction(entry), add_special_tokens=False).input_ids for entry in book_data[:8]]
    )
    assert torch.equal(batch["input_ids"][:, :-1], book_inputs)
    assert torch.equal(batch["labels"][:, 1:], book_targets)


def test_collator_pads_to_a_multiple():
    batch = InstructionCollator(EOS, pad_to_multiple_of=8)(FEATURES)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][:, 5:].eq(X).all() and batch["attention_mask"][:, 5:].eq(0).all()


def test_collator_needs_prompt_length_only_to_mask_the_prompt():
    features = [{"input_ids": feature["input_ids"]} for feature in FEATURES]
    assert InstructionCollator(EOS)(features)["labels"].tolist() == [[1, 2, 3, 4, EOS], [5, 6, EOS, X, X]]
    with pytest.raises(ValueError, match="remove_unused_columns=False") as error:
        InstructionCollator(EOS, mask_prompt=True)(features)
    one_line(error)


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_packing_puts_the_batch_in_one_row(mask_prompt):
    packed = InstructionCollator(EOS, mask_prompt=mask_prompt, packing=True)(FEATURES)
    assert "attention_mask" not in packed  # padding-free
    assert set(packed) == {"input_ids", "position_ids", "labels", "use_cache", "cu_seq_lens_q", "cu_seq_lens_k",
                           "max_length_q", "max_length_k"}
    assert packed["use_cache"] is False  # a KV cache would hide the packing from transformers' masks
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, EOS, 5, 6, EOS]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    expected = [X, X, 3, 4, EOS, X, 6, EOS] if mask_prompt else [X, 2, 3, 4, EOS, X, 6, EOS]
    assert packed["labels"].tolist() == [expected]
    # transformers reads two examples from the restarting positions
    assert find_packed_sequence_indices(packed["position_ids"]).tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]
    # The model scores labels[:, 1:]: packed or not, the same number of targets.
    padded = InstructionCollator(EOS, mask_prompt=mask_prompt)(FEATURES)
    assert packed["labels"][:, 1:].ne(X).sum() == padded["labels"][:, 1:].ne(X).sum()


def test_packing_pads_with_an_example_of_its_own():
    packed = InstructionCollator(EOS, packing=True, pad_to_multiple_of=5)(FEATURES)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, EOS, 5, 6, EOS, EOS, EOS]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1]]
    assert packed["labels"][0, 8:].tolist() == [X, X]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_examples_do_not_see_each_other(attn_implementation):
    """ScratchGPT gives each packed example the logits it has alone, and the packed batch the padded loss."""
    torch.manual_seed(0)
    config = ScratchGPTConfig.from_preset("tiny", drop_rate=0.0, attn_implementation=attn_implementation)
    model = ScratchGPTForCausalLM(config).eval()
    features = [
        {"input_ids": torch.randint(1, 1000, (length,)).tolist() + [0], "prompt_length": 3} for length in (7, 4, 11)
    ]
    with torch.no_grad():  # the packed batch says use_cache=False: in eval mode a KV cache would hide the packing
        batch = InstructionCollator(0, mask_prompt=True, packing=True)(features)
        packed = model(**batch)
        padded = model(**InstructionCollator(0, mask_prompt=True)(features), use_cache=False)
        assert batch["input_ids"].shape == (1, 8 + 5 + 12)  # one row, longest example first
        for feature in features:
            ids = torch.tensor(feature["input_ids"])
            alone = model(ids[None], use_cache=False).logits[0]
            start = next(c for c in range(25 - len(ids) + 1) if torch.equal(batch["input_ids"][0, c : c + len(ids)], ids))
            torch.testing.assert_close(packed.logits[0, start : start + len(ids)], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-5, rtol=1e-5)


def test_packed_batch_gives_the_example_boundaries():
    batch = InstructionCollator(EOS, packing=True, pad_to_multiple_of=5)(FEATURES)
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 5, 8, 10]  # padding: its own
    assert batch["max_length_q"] == batch["max_length_k"] == 5


def test_sdpa_attends_each_packed_example_alone():
    """With the boundaries, SDPA runs one causal attention per example, and gives what the block mask gives."""
    from hf_scratchgpt.speedups_scratchgpt import packed_sdpa_attention

    torch.manual_seed(0)
    config = ScratchGPTConfig.from_preset("tiny", drop_rate=0.0, attn_implementation="sdpa")
    model = ScratchGPTForCausalLM(config).eval()
    features = [{"input_ids": torch.randint(1, 1000, (n,)).tolist() + [0]} for n in (9, 4, 12)]
    batch = InstructionCollator(0, packing=True)(features)
    with mock.patch("hf_scratchgpt.modeling_scratchgpt.packed_sdpa_attention", wraps=packed_sdpa_attention) as per_example:
        with torch.no_grad():
            packed = model(**batch).logits
    assert per_example.call_count == config.n_layers
    without_boundaries = {k: v for k, v in batch.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    with torch.no_grad():
        masked = model(**without_boundaries).logits  # the block-diagonal mask
    torch.testing.assert_close(packed, masked, atol=1e-5, rtol=1e-5)
