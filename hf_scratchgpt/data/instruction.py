"""Chapter 7, instruction data: entries, the book's split, the Alpaca prompt (in Python and as a chat template),
token ids with a known prompt/response boundary, and the collator that makes batches of them.

An entry is either the book's Alpaca entry, `{"instruction", "input" (optional), "output"}`, or a chat entry,
`{"messages": [{"role", "content"}, ...]}` with roles system, user and assistant, ending with the assistant turn
to learn. Both are written in the book's Alpaca prompt format:

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:            (only when the entry has an input)
    {input}

    ### Response:
    {output}<|endoftext|>

A chat entry's system message takes the place of the first line; each user turn is an "### Instruction:" section
and each assistant turn a "### Response:" section closed by the eos token. `render_prompt` writes this in Python,
`CHAT_TEMPLATE` in Jinja (for `tokenizer.apply_chat_template`, saved with the tokenizer); the tests check that the
two give the same token ids on every entry of the book's data.

The book (`InstructionDataset`, `custom_collate_fn`) tokenizes prompt and response as one text, appends the eos
token in the collator and shifts inputs and targets by one there. Here `tokenize_instructions` tokenizes the
prompt and the response apart, so the boundary between them is exact (`prompt_length`), and appends the eos; the
`InstructionCollator` pads without shifting, since a transformers causal LM shifts its labels itself.
"""

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import pyarrow as pa
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset
from transformers import PreTrainedTokenizerBase

from ..hub import is_local_path
from ..tokenization import EOS_TOKEN


__all__ = [
    "INSTRUCTION_KEYS",
    "CHAT_ROLES",
    "CHAT_TEMPLATE",
    "InstructionSource",
    "load_instruction_data",
    "instruction_splits",
    "format_instruction",
    "to_messages",
    "render_prompt",
    "response_text",
    "add_chat_template",
    "tokenize_instructions",
    "InstructionCollator",
]

INSTRUCTION_KEYS = ("instruction", "input", "output")
CHAT_ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # the label that PyTorch's cross-entropy (and so every transformers loss) leaves out

# What `load_instruction_data` reads: a JSON or JSON Lines file, a Hub dataset id, a list of entries, a Dataset.
InstructionSource = str | os.PathLike | Sequence[Mapping] | Dataset

PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
INSTRUCTION_HEADER = "\n\n### Instruction:\n"
INPUT_HEADER = "\n\n### Input:\n"
RESPONSE_HEADER = "\n\n### Response:\n"


# ----------------------------------------------------------------------------------------------------------
# Entries: loading and checking


def load_instruction_data(source: InstructionSource, *, split: str = "train") -> Dataset:
    """Instruction entries as a dataset, each checked, in the order given.

    Args:
        source: a JSON file holding a list of entries (the book's `instruction-data.json`), a JSON Lines file
            (`.jsonl`, one entry per line), a Hub dataset id (a `str` that is no local path, see `hub.py`),
            a list of entries (dicts) or a `Dataset`.
        split: the split of a Hub dataset.

    Alpaca entries keep their columns `instruction`, `input` and `output` (a missing or null input becomes "");
    chat entries keep `messages`. Other fields of the entries (an id, a model's response) are kept as given.
    All entries must be of one kind. Bad input is a one-line `ValueError` naming the file and the entry.
    """
    if isinstance(source, (DatasetDict, IterableDatasetDict)):
        raise ValueError(f"the instruction data is a dict of splits {list(source)}: pass one, e.g. data['train']")
    if isinstance(source, IterableDataset):
        raise ValueError("streamed instruction data is not supported: load it as a Dataset (streaming=False)")
    if isinstance(source, Dataset):
        return _checked_dataset(source, "the dataset")
    if isinstance(source, str) and not is_local_path(source):  # the project's one rule: see hub.py
        return _checked_dataset(load_dataset(source, split=split), f"{source} ({split} split)")
    if isinstance(source, (str, os.PathLike)):
        entries, where = _read_file(Path(source).expanduser())
    elif isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("no instruction entries: the list is empty")
        entries, where = list(source), _entry_at("")
    else:
        raise ValueError(
            "instruction data is a JSON or JSONL file, a Hub id, a list of entries or a Dataset, "
            f"got {type(source).__name__}"
        )
    if _check_entries(entries, where) == "alpaca":
        entries = [{**entry, "input": entry.get("input") or ""} for entry in entries]  # checked: str or None
    # Columns from the fields of all entries (`Dataset.from_list` would take the first entry's only).
    names = list(dict.fromkeys(name for entry in entries for name in entry))
    columns = {name: [entry.get(name) for entry in entries] for name in names}
    try:
        return Dataset.from_dict(columns)
    except pa.ArrowException as error:  # an extra field of another type in some entries: say which, and where
        for name, values in columns.items():
            if not _fits(values):
                first = {}  # each type of value, and the first entry that has it
                for index, value in enumerate(values):
                    if value is not None:
                        first.setdefault(type(value).__name__, index)
                if len(first) == 1:  # lists or dicts of different contents: the first entry that does not fit
                    index = next(i for i in range(len(values)) if not _fits(values[: i + 1]))
                    first = {f"{type(values[index]).__name__} of another kind": index}
                kinds = " and ".join(f"{kind} ({where(index)})" for kind, index in first.items())
                raise ValueError(f"the field {name!r} holds values of more than one type ({kinds}; {error}): give "
                                 "them one type, or leave the field out") from None
        raise


def _fits(values: list) -> bool:
    try:
        pa.array(values)
    except pa.ArrowException:
        return False
    return True


def _read_file(path: Path) -> tuple[list, Callable[[int], str]]:
    """The entries of a JSON file (a list) or a JSON Lines file (`.jsonl`), and how to name entry i in errors."""
    if not path.is_file():
        raise FileNotFoundError(f"instruction data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; expected instruction entries")
    if path.suffix.lower() == ".jsonl":
        entries, line_numbers = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue  # blank lines (a trailing one, most often) hold no entry
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: invalid JSON: {error.msg} (column {error.colno})") from None
            line_numbers.append(number)
        return entries, lambda index: f"{path}, entry {index} (line {line_numbers[index]})"
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg} "
            "(a .jsonl file holds one entry per line)"
        ) from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    if not entries:
        raise ValueError(f"{path}: no instruction entries: the list is empty")
    return entries, _entry_at(f"{path}, ")


def _entry_at(prefix: str) -> Callable[[int], str]:
    return lambda index: f"{prefix}entry {index}"


def _checked_dataset(dataset: Dataset, name: str) -> Dataset:
    """Check a dataset's rows as entries; give Alpaca data an `input` column of "" where it has none or nulls."""
    if len(dataset) == 0:
        raise ValueError(f"{name} has no rows: no instruction entries")
    if _check_entries(dataset, _entry_at(f"{name}, ")) == "chat":
        return dataset
    if "input" not in dataset.column_names:
        return dataset.add_column("input", [""] * len(dataset))
    if None in dataset["input"]:
        return dataset.map(lambda batch: {"input": [text or "" for text in batch["input"]]}, batched=True)
    return dataset


def _check_entries(entries: Iterable, where: Callable[[int], str]) -> str:
    """Check every entry; all must be of one kind, "alpaca" or "chat", which is returned."""
    kind = None
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where(index)}: expected an object (a dict), got {type(entry).__name__}")
        entry_kind = _kind(entry)
        if entry_kind is None:
            raise ValueError(
                f"{where(index)}: expected an Alpaca entry (instruction, input, output) or a chat entry "
                f"(messages), got the fields {sorted(entry)}"
            )
        if kind is not None and entry_kind != kind:
            raise ValueError(f"{where(index)}: a {entry_kind} entry among {kind} entries; use one kind of entry")
        kind = entry_kind
        if kind == "alpaca":
            _check_alpaca_entry(entry, where(index))
        else:
            _check_chat_entry(entry["messages"], where(index))
    return kind


def _kind(entry: Mapping) -> str | None:
    """"chat" for an entry with messages, "alpaca" for one with an instruction or output, None otherwise."""
    if entry.get("messages") is not None:  # a Dataset's row holds None for a column that an entry lacks
        return "chat"
    if any(entry.get(key) is not None for key in INSTRUCTION_KEYS):
        return "alpaca"
    return None


def _check_alpaca_entry(entry: Mapping, where: str) -> None:
    for key in INSTRUCTION_KEYS:
        value = entry.get(key)
        if value is None and key != "input":
            raise ValueError(f"{where}: missing {key!r}")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: {key!r} must be a string, not {type(value).__name__}")


def _check_chat_entry(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of turns, got {messages!r:.60}")
    for number, turn in enumerate(messages):
        here = f"{where}, turn {number}"
        if not isinstance(turn, Mapping):
            raise ValueError(f"{here}: expected an object with role and content, got {type(turn).__name__}")
        for key in ("role", "content"):
            if turn.get(key) is None:
                raise ValueError(f"{here}: missing {key!r}")
            if not isinstance(turn[key], str):
                raise ValueError(f"{here}: {key!r} must be a string, not {type(turn[key]).__name__}")
        if turn["role"] not in CHAT_ROLES:
            raise ValueError(f"{here}: unknown role {turn['role']!r}; expected system, user or assistant")
        if turn["role"] == "system" and number > 0:
            raise ValueError(f"{here}: a system turn can only be the first one")
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"{where}: the conversation ends with a {messages[-1]['role']} turn; "
            "it must end with an assistant turn, the response to learn"
        )


def instruction_splits(dataset: Dataset) -> DatasetDict:
    """The book's chapter 7 split, in file order: 85% train, 10% test, the remaining 5% validation."""
    train_end = int(len(dataset) * 0.85)
    test_end = train_end + int(len(dataset) * 0.1)
    return DatasetDict(
        train=dataset.select(range(train_end)),
        test=dataset.select(range(train_end, test_end)),
        validation=dataset.select(range(test_end, len(dataset))),
    )


# ----------------------------------------------------------------------------------------------------------
# The Alpaca prompt: in Python, and as a chat template


def format_instruction(entry: Mapping[str, str], *, with_response: bool = True) -> str:
    """An Alpaca entry in the prompt format of the book's chapter 7.

    `with_response=False` gives the book's `format_input(entry)`, the prompt without its response section;
    the default appends `"\\n\\n### Response:\\n" + output`, the full text of a training example.
    """
    text = PREAMBLE + INSTRUCTION_HEADER + entry["instruction"]
    if entry.get("input"):
        text += INPUT_HEADER + entry["input"]
    if with_response:
        text += RESPONSE_HEADER + entry["output"]
    return text


def to_messages(entry: Mapping) -> list[dict]:
    """An entry as chat turns: an Alpaca entry as a user turn (instruction, then its input section) and an
    assistant turn (output); a chat entry's messages as they are."""
    if entry.get("messages") is not None:
        return entry["messages"]
    content = entry["instruction"]
    if entry.get("input"):
        content += INPUT_HEADER + entry["input"]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": entry["output"]}]


def render_prompt(entry: Mapping, *, eos_token: str = EOS_TOKEN) -> str:
    """The text a model answers: the entry up to and including its last "\\n\\n### Response:\\n".

    For an Alpaca entry, `format_instruction(entry, with_response=False) + "\\n\\n### Response:\\n"`. For a chat
    entry, every turn before the final assistant turn (all turns when the last is a user turn), then the
    response header: what `CHAT_TEMPLATE` renders with `add_generation_prompt=True`. Earlier assistant turns
    end with `eos_token`, as the template ends them with the tokenizer's.
    """
    if entry.get("messages") is None:
        return format_instruction(entry, with_response=False) + RESPONSE_HEADER
    turns = entry["messages"]
    if turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    text = PREAMBLE
    if turns and turns[0]["role"] == "system":
        text, turns = turns[0]["content"], turns[1:]
    for turn in turns:
        if turn["role"] == "user":
            text += INSTRUCTION_HEADER + turn["content"]
        else:
            text += RESPONSE_HEADER + turn["content"] + eos_token
    return text + RESPONSE_HEADER


def response_text(entry: Mapping) -> str:
    """The response to learn: an Alpaca entry's output, a chat entry's last (assistant) turn."""
    if entry.get("messages") is None:
        return entry["output"]
    last = entry["messages"][-1]
    if last["role"] != "assistant":
        raise ValueError(f"the conversation ends with a {last['role']} turn, not with an assistant response")
    return last["content"]


# The same text as `render_prompt(entry) + response_text(entry) + eos_token`, in Jinja, for
# `tokenizer.apply_chat_template(to_messages(entry))`. The response and its eos sit in a generation block, so that
# `return_assistant_tokens_mask=True` marks exactly the tokens to learn. `raise_exception` is transformers'.
CHAT_TEMPLATE = r"""{#- Chapter 7's Alpaca prompt format (hf_scratchgpt.data.instruction) -#}
{%- if messages[0]['role'] == 'system' -%}
    {{- messages[0]['content'] -}}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {{- 'Below is an instruction that describes a task. Write a response that appropriately completes the request.' -}}
    {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if message['role'] == 'user' -%}
        {{- '\n\n### Instruction:\n' + message['content'] -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '\n\n### Response:\n' -}}
        {%- generation -%}
            {{- message['content'] + eos_token -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- raise_exception('a turn of role ' + message['role'] + ': expected user, assistant, or system first') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '\n\n### Response:\n' -}}
{%- endif -%}
"""


def add_chat_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give `tokenizer` the Alpaca `CHAT_TEMPLATE` (`save_pretrained` writes it to `chat_template.jinja`)."""
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ----------------------------------------------------------------------------------------------------------
# Token ids: prompt, response, eos


def tokenize_instructions(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    num_proc: int | None = None,
) -> tuple[Dataset, int]:
    """Each entry as `input_ids` = ids(prompt) + ids(response) + [eos], and `prompt_length` = len(ids(prompt)).

    Prompt (`render_prompt`) and response (`response_text`) are tokenized apart, with no special tokens added,
    so `prompt_length` is the exact boundary; the other columns are removed. With `max_length`, a longer example
    is cut to `ids[:max_length - 1] + [eos]`: the response loses its end (the prompt too, when it alone is that
    long) but the example keeps the eos that teaches the model to stop. (The book's `allowed_max_length` cuts
    after the eos is appended, so a long example loses it.) Returns the tokenized dataset and how many examples
    were cut, for the recipe to report.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token to close each response with")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an integer of at least 2 (a token and the eos), got {max_length!r}")
    tokenized = dataset.map(
        _tokenize_examples,
        batched=True,
        remove_columns=dataset.column_names,
        fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length),
        num_proc=num_proc,
        desc="Tokenizing",
    )
    num_cut = sum(tokenized["cut"])
    return tokenized.remove_columns("cut"), num_cut


def _tokenize_examples(batch: dict, tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> dict:
    entries = [dict(zip(batch, values)) for values in zip(*batch.values())]
    encode = dict(add_special_tokens=False, return_attention_mask=False, verbose=False)
    prompts = tokenizer([render_prompt(entry, eos_token=tokenizer.eos_token) for entry in entries], **encode)
    responses = tokenizer([response_text(entry) for entry in entries], **encode)
    input_ids, prompt_lengths, cut = [], [], []
    for prompt, response in zip(prompts["input_ids"], responses["input_ids"]):
        ids = prompt + response
        too_long = max_length is not None and len(ids) + 1 > max_length
        if too_long:
            ids = ids[: max_length - 1]  # room for the eos, which is always the last target
        input_ids.append(ids + [tokenizer.eos_token_id])
        prompt_lengths.append(min(len(prompt), len(ids)))
        cut.append(too_long)
    return {"input_ids": input_ids, "prompt_length": prompt_lengths, "cut": cut}


# ----------------------------------------------------------------------------------------------------------
# Batches: the book's custom_collate_fn, unshifted, and a padding-free packing


@dataclass
class InstructionCollator:
    """Batches of `tokenize_instructions` examples (`input_ids`, `prompt_length`) for a causal LM.

    The book's `custom_collate_fn`, without its shift: a transformers causal LM shifts the labels itself (the
    logits at position t are scored against labels[t + 1]), so here `labels` are the input ids, with -100 where
    no loss is wanted. Each example already ends with its eos, a real token and a target; padding comes after
    it and is never a target, even where the padding id is the eos id (as in GPT-2). Padding is told by position,
    not by id, so an eos inside an example (ending an earlier turn of a conversation) stays a target.

    - `mask_prompt=False` (the book): the prompt's tokens are targets too. `mask_prompt=True` (the book's
      exercise 7.2): only the response and its eos are, the prompt's labels are -100.
    - `packing=False`: rows right-padded with `pad_token_id` to the batch's longest example (rounded up to
      `pad_to_multiple_of`), an `attention_mask` of 1 on real tokens and 0 on padding, `labels` -100 on padding.
    - `packing=True`: the whole batch in one row, padding-free as transformers' `DataCollatorWithFlattening`:
      `input_ids` and `labels` of shape (1, total tokens), `position_ids` that restart at 0 at each example, and
      no `attention_mask`. Given position_ids and no attention mask, `create_causal_mask` (which ScratchGPT uses)
      reads a new example wherever the positions do not go up by one, and keeps each example from attending to
      the others; the restarting positions also give every example the position embeddings it has alone. The
      boundaries also come as `cu_seq_lens_q` / `cu_seq_lens_k` and `max_length_q` / `max_length_k`, which flash
      attention's variable-length kernels and ScratchGPT's SDPA take: each example is then attended alone, so a
      packed row costs what its real tokens cost. The first token of each example is labelled -100: the shifted
      loss would otherwise score the previous example's eos against it (unpacked, a first token is never a target
      either), so a batch has the same targets packed or not. `pad_to_multiple_of` appends padding as one more
      example of its own (positions from 0, labels -100). The batch says `use_cache=False`: with a KV cache no
      packing is detected.

    Trainer drops dataset columns that the model's forward does not take, `prompt_length` among them: with
    `mask_prompt`, train with `remove_unused_columns=False`.
    """

    pad_token_id: int
    _: KW_ONLY
    mask_prompt: bool = False
    packing: bool = False
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.pad_to_multiple_of is not None and (
            isinstance(self.pad_to_multiple_of, bool)
            or not isinstance(self.pad_to_multiple_of, int)
            or self.pad_to_multiple_of < 1
        ):
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {self.pad_to_multiple_of!r}")

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        examples = [self._example(index, feature) for index, feature in enumerate(features)]
        return self._pack(examples) if self.packing else self._pad(examples)

    def _example(self, index: int, feature: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """An example's input ids and labels (its prompt -100 with `mask_prompt`)."""
        input_ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
        if input_ids.ndim != 1 or len(input_ids) == 0:
            raise ValueError(f"batch example {index}: input_ids must be a non-empty list of ids")
        labels = input_ids.clone()
        if self.mask_prompt:
            if "prompt_length" not in feature:
                raise ValueError(
                    f"batch example {index} has no 'prompt_length', which mask_prompt needs "
                    "(from tokenize_instructions; with Trainer, set remove_unused_columns=False)"
                )
            labels[: int(feature["prompt_length"])] = IGNORE_INDEX
        return input_ids, labels

    def _padded_length(self, length: int) -> int:
        multiple = self.pad_to_multiple_of or 1
        return -(-length // multiple) * multiple  # rounded up

    def _pad(self, examples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = self._padded_length(max(len(ids) for ids, _ in examples))
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
        for row, (ids, example_labels) in enumerate(examples):
            input_ids[row, : len(ids)] = ids
            labels[row, : len(ids)] = example_labels
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _pack(self, examples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        input_ids, labels, position_ids = [], [], []
        for ids, example_labels in examples:
            example_labels = example_labels.clone()
            example_labels[0] = IGNORE_INDEX  # not to be predicted from the previous example's last token
            input_ids.append(ids)
            labels.append(example_labels)
            position_ids.append(torch.arange(len(ids)))
        total = sum(len(ids) for ids in input_ids)
        padding = self._padded_length(total) - total
        if padding:  # one more example, of padding only: positions restart, nothing to learn
            input_ids.append(torch.full((padding,), self.pad_token_id, dtype=torch.long))
            labels.append(torch.full((padding,), IGNORE_INDEX, dtype=torch.long))
            position_ids.append(torch.arange(padding))
        lengths = torch.tensor([len(ids) for ids in input_ids])
        cu_seq_lens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # [0, len_1, len_1 + len_2, ..., total]
        return {
            "input_ids": torch.cat(input_ids).unsqueeze(0),  # (1, total)
            "position_ids": torch.cat(position_ids).unsqueeze(0),  # (1, total)
            "labels": torch.cat(labels).unsqueeze(0),  # (1, total)
            # Where each example starts and ends, as flash attention's variable-length kernels (and ScratchGPT's
            # SDPA) take them: each example is attended alone, at the cost of its own tokens.
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": int(lengths.max()),
            "max_length_k": int(lengths.max()),
            # No KV cache: transformers tells packed examples apart only without a cache (nor attention mask), and
            # a model in eval mode would otherwise build one, letting packed examples attend to each other.
            "use_cache": False,
        }