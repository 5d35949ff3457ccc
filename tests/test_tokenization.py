"""Tests of hf_scratchgpt/tokenization.py (chapter 2): GPT-2 parity with tiktoken, exact round trips, training, saving and loading."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hf_scratchgpt.tokenization import EOS_TOKEN, gpt2_tokenizer, gpt2_tokenizer_from_dir, train_bpe_tokenizer


# Published in ../shared/data/README.md (the book's chapter 2 example).
REFERENCE_TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terraces"
REFERENCE_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114]

HARD_STRINGS = {
    "empty": "",
    "chinese": "大型语言模型从零开始构建，你好世界。",
    "emoji_zwj": "family 👨‍👩‍👧‍👦, flag 🏳️‍🌈, skin tone 👍🏽!",
    "no_break_and_em_spaces": "a\u00a0b\u2003c\u2009d \u3000e",
    "code": 'def f(x):\n\treturn {"y": x ** 2}  # square\n\nprint(f(3))\n',
    "whitespace_runs": "a   b\n\n\n c\t\t\td \r\n  \n\t \n      ",
    "eos_inside_text": "one<|endoftext|>two <|endoftext|> three<|endoftext|><|endoftext|>",
    "contractions": "I'm sure you'll see THEY'RE right, it's 'quoted'",
    "accents_and_ligatures": "café naïve ﬁne e\u0301",
    "cyrillic_arabic_devanagari": "Привет мир مرحبا بالعالم नमस्ते दुनिया",
    "control_bytes": "\x00\x01\x7f\x1b[0m",
    "long_word": "x" * 500,
}


@pytest.fixture(scope="module")
def verdict(shared_data: Path) -> str:
    return (shared_data / "the-verdict.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def trained(verdict: str):
    return train_bpe_tokenizer([verdict], vocab_size=1000)


def test_gpt2_gives_the_published_ids(gpt2):
    assert gpt2.encode(REFERENCE_TEXT) == REFERENCE_IDS
    assert gpt2.eos_token == EOS_TOKEN and gpt2.eos_token_id == 50256
    assert len(gpt2) == 50257


def test_gpt2_matches_tiktoken_on_the_verdict(gpt2, tiktoken_gpt2, verdict):
    ids = gpt2.encode(verdict)
    assert ids == tiktoken_gpt2.encode(verdict)
    assert len(ids) == 5145  # README: "5,145 GPT-2 tokens"
    assert gpt2.decode(ids) == verdict


@pytest.mark.parametrize("text", HARD_STRINGS.values(), ids=HARD_STRINGS.keys())
def test_gpt2_matches_tiktoken_on_hard_strings(gpt2, tiktoken_gpt2, text):
    ids = gpt2(text)["input_ids"]
    assert ids == tiktoken_gpt2.encode(text, allowed_special={EOS_TOKEN})
    assert gpt2.decode(ids) == text


def test_round_trip_through_tokens_that_are_not_whole_characters(gpt2):
    text = "🤖 says 你好"
    ids = gpt2.encode(text)
    pieces = [gpt2.decode([token]) for token in ids]
    assert any("\ufffd" in piece for piece in pieces)  # some tokens hold part of a character's bytes
    assert gpt2.decode(ids) == text


def test_gpt2_from_dir_reads_openai_files_and_saved_folders(gpt2, shared_data, tmp_path, verdict):
    from_openai_files = gpt2_tokenizer_from_dir(shared_data / "gpt2")
    gpt2.save_pretrained(tmp_path)
    from_saved = gpt2_tokenizer_from_dir(tmp_path)
    text = verdict[:2000] + REFERENCE_TEXT + HARD_STRINGS["emoji_zwj"]
    assert from_openai_files.encode(text) == gpt2.encode(text)
    assert from_saved.encode(text) == gpt2.encode(text)
    assert from_saved.decode(from_saved.encode(text)) == text


def test_gpt2_names_a_missing_file(shared_data, tmp_path):
    missing = tmp_path / "vocab.bpe"
    with pytest.raises(FileNotFoundError, match="vocab.bpe"):
        gpt2_tokenizer(shared_data / "gpt2" / "encoder.json", missing)


def test_gpt2_without_padding_token(shared_data):
    folder = shared_data / "gpt2"
    tokenizer = gpt2_tokenizer(folder / "encoder.json", folder / "vocab.bpe", pad_token=None)
    assert tokenizer.pad_token is None
    assert tokenizer.encode(REFERENCE_TEXT) == REFERENCE_IDS


def test_trained_tokenizer_round_trips_the_verdict(trained, verdict):
    assert len(trained) == 1000
    ids = trained.encode(verdict)
    assert trained.decode(ids) == verdict
    assert len(ids) < len(verdict.encode("utf-8")) / 2  # merges learnt: fewer tokens than bytes


@pytest.mark.parametrize("text", HARD_STRINGS.values(), ids=HARD_STRINGS.keys())
def test_trained_tokenizer_round_trips_text_it_never_saw(trained, text):
    assert trained.decode(trained.encode(text)) == text


def test_trained_tokenizer_special_tokens(trained):
    assert trained.eos_token == trained.pad_token == EOS_TOKEN
    ids = trained.encode(f"the end{EOS_TOKEN}")
    assert ids[-1] == trained.eos_token_id
    assert trained.eos_token_id not in trained.encode("the end<|endoftext")


def test_trained_tokenizer_other_padding_token(verdict):
    tokenizer = train_bpe_tokenizer([verdict], vocab_size=400, pad_token="<|pad|>")
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    assert train_bpe_tokenizer([verdict], vocab_size=400, pad_token=None).pad_token is None


def test_training_on_a_file_equals_training_on_its_text(shared_data, trained):
    from_path = train_bpe_tokenizer(shared_data / "the-verdict.txt", vocab_size=1000)
    from_str_path = train_bpe_tokenizer(str(shared_data / "the-verdict.txt"), vocab_size=1000)
    assert from_path.get_vocab() == trained.get_vocab()
    assert from_str_path.get_vocab() == trained.get_vocab()


def test_trained_tokenizer_saves_and_loads_with_auto_tokenizer(trained, tmp_path, verdict):
    trained.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = verdict[:3000] + HARD_STRINGS["whitespace_runs"] + " a , b ."
    assert loaded.encode(text) == trained.encode(text)
    assert loaded.eos_token == EOS_TOKEN and loaded.eos_token_id == trained.eos_token_id
    assert loaded.decode(loaded.encode(text)) == text  # no space clean-up after loading either


def test_vocab_size_must_hold_bytes_and_special_tokens(verdict):
    with pytest.raises(ValueError, match=r"at least 257 .* got 256") as error:
        train_bpe_tokenizer([verdict], vocab_size=256)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="at least 258"):
        train_bpe_tokenizer([verdict], vocab_size=257, pad_token="<|pad|>")


@pytest.mark.parametrize("corpus", [[], [""], ["", ""]], ids=["no_texts", "empty_text", "empty_texts"])
def test_training_on_an_empty_corpus_fails(corpus):
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe_tokenizer(corpus, vocab_size=300)


def test_training_names_a_missing_file(shared_data, tmp_path):
    missing = tmp_path / "no-such-corpus.txt"
    with pytest.raises(FileNotFoundError, match="no-such-corpus.txt"):
        train_bpe_tokenizer(missing, vocab_size=300)
    with pytest.raises(FileNotFoundError, match="no-such-corpus.txt"):
        train_bpe_tokenizer([shared_data / "the-verdict.txt", missing], vocab_size=300)


def test_gpt2_from_a_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        gpt2_tokenizer_from_dir(tmp_path / "no-such-folder")
