"""The data of every chapter, on `datasets`, one module per chapter of the book.

- `pretraining`: chapter 2's sliding windows over a text corpus (files, texts, a dataset, a stream or a Hub
  id), and chapter 5's train/validation split of that corpus.
- `corpus_pieces` and `token_store`: the same windows for corpora larger than memory: text read in pieces, token
  ids tokenized once into memory-mapped files on disk and reused, windows sliced from them on demand, or cut from
  a stream.
- `classification`: chapter 6's labelled texts (any table or Hub dataset, and the book's SMS Spam Collection),
  their stratified or balanced split and token ids.
- `instruction`: chapter 7's instruction data, its split and the Alpaca prompt format.

Every name is also importable from `hf_scratchgpt.data` itself.
"""

from .classification import (
    SMS_LABELS,
    SPLITS,
    TABLE_FORMATS,
    balance_classes,
    classification_features,
    classification_splits,
    load_classification_data,
    load_sms_spam,
    read_table,
    sms_spam_splits,
    stratified_split,
)
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
    CorpusPart,
    TextSource,
    TokenWindows,
    corpus_parts,
    default_corpus,
    load_text_dataset,
    pretraining_windows,
    split_corpus,
    tokenize_dataset,
)


__all__ = [
    "TextSource",
    "CorpusPart",
    "TokenWindows",
    "corpus_parts",
    "default_corpus",
    "load_text_dataset",
    "tokenize_dataset",
    "pretraining_windows",
    "split_corpus",
    "SMS_LABELS",
    "SPLITS",
    "TABLE_FORMATS",
    "load_sms_spam",
    "sms_spam_splits",
    "read_table",
    "load_classification_data",
    "balance_classes",
    "stratified_split",
    "classification_splits",
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
