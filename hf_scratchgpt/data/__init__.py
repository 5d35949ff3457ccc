"""The data of every chapter, on `datasets`, one module per chapter of the book.

- `pretraining`: chapter 2's sliding windows over a text corpus (files, texts, a dataset, a stream or a Hub
  id), and chapter 5's train/validation split of that corpus.
- `classification`: chapter 6's SMS Spam Collection, its balanced split and token ids.
- `instruction`: chapter 7's instruction data, its split and the Alpaca prompt format.

Every name is also importable from `hf_scratchgpt.data` itself.
"""

from .classification import SMS_LABELS, classification_features, load_sms_spam, sms_spam_splits
from .instruction import (
    CHAT_ROLES,
    CHAT_TEMPLATE,
    INSTRUCTION_KEYS,
    InstructionCollator,
    InstructionSource,
    add_chat_template,
    format_instruction,
    instruction_splits,
    load_instruction_data,
    render_prompt,
    response_text,
    to_messages,
    tokenize_instructions,
)
from .pretraining import (
    TextSource,
    default_corpus,
    load_text_dataset,
    pretraining_windows,
    split_corpus,
    tokenize_dataset,
)


__all__ = [
    "TextSource",
    "default_corpus",
    "load_text_dataset",
    "tokenize_dataset",
    "pretraining_windows",
    "split_corpus",
    "SMS_LABELS",
    "load_sms_spam",
    "sms_spam_splits",
    "classification_features",
    "INSTRUCTION_KEYS",
    "load_instruction_data",
    "instruction_splits",
    "format_instruction",
    "InstructionSource",
    "CHAT_ROLES",
    "CHAT_TEMPLATE",
    "to_messages",
    "render_prompt",
    "response_text",
    "add_chat_template",
    "tokenize_instructions",
    "InstructionCollator",
]
