"""Shared fixtures: the reference data next to the repository, and a `datasets` cache that is the test's own."""

import hashlib
import os
from pathlib import Path

import datasets
import pytest


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder ../shared/data: skipped when absent, except on CI (CI=true), where that is a failure."""
    if not SHARED_DATA.is_dir():
        message = f"reference data folder not found: {SHARED_DATA}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point `datasets`' cache at a temporary folder, so that tests neither read nor fill ~/.cache."""
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        yield cache


@pytest.fixture(scope="session")
def tiktoken_gpt2(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """tiktoken's `gpt2` encoding, the book's tokenizer, read offline from the reference GPT-2 files.

    tiktoken looks for each file in TIKTOKEN_CACHE_DIR under the sha1 of its download address.
    """
    import tiktoken  # in the test extra: a missing tiktoken is a failure, not a skip

    cache = tmp_path_factory.mktemp("tiktoken_cache")
    for name in ("vocab.bpe", "encoder.json"):
        url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes((shared_data / "gpt2" / name).read_bytes())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        yield tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="session")
def gpt2(shared_data: Path):
    """GPT-2's tokenizer built by the package from the reference files."""
    from hf_scratchgpt.tokenization import gpt2_tokenizer

    return gpt2_tokenizer(shared_data / "gpt2" / "encoder.json", shared_data / "gpt2" / "vocab.bpe")


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 2,048 characters and record batches of 4 pieces, so that files of kilobytes cross the boundaries
    that gigabytes cross at the real sizes (`corpus_pieces.PIECE_CHARS`, `token_store.PIECES_PER_BATCH`)."""
    from hf_scratchgpt.data import corpus_pieces, token_store

    monkeypatch.setattr(corpus_pieces, "PIECE_CHARS", 2048)
    monkeypatch.setattr(token_store, "PIECES_PER_BATCH", 4)


@pytest.fixture(scope="session")
def long_file(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One document of about 30 pieces of 2,048 characters, with the whitespace runs (several spaces, newlines,
    no-break and ideographic spaces) that a careless cut would tokenize differently."""
    verdict = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")
    text = verdict + "\n\n  \n\t" + verdict.replace(" ", "  ") + " \u00a0\u3000x" * 100 + verdict.replace(" ", "\n")
    path = tmp_path_factory.mktemp("long") / "long.txt"
    path.write_text(text, encoding="utf-8")
    return path
