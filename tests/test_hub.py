"""The one rule of every chapter's loading: a local file or folder, or a Hugging Face Hub id."""

from pathlib import Path

import pytest

from hf_scratchgpt.hub import check_local_path, is_local_path


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder that is also the home folder, so relative names and `~` stay inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_existing_files_and_folders_are_local(here):
    (here / "corpus").mkdir()  # a bare name, as a Hub id is written: local because it exists
    (here / "notes").write_text("text", encoding="utf-8")
    for name in ("corpus", "notes", str(here / "notes"), here / "notes"):
        assert is_local_path(name)
        check_local_path("--train_file", name)


@pytest.mark.parametrize("name", ["./missing", "../missing", "/no/such/folder", "~/x", "a.jsonl", "B.TXT", "d.parquet"])
def test_names_written_as_paths_are_local_even_when_missing(here, name):
    assert is_local_path(name)
    assert is_local_path(Path(name))
    with pytest.raises(FileNotFoundError) as error:
        check_local_path("--train_file", name)
    assert str(error.value) == f"--train_file {name}: no such file or folder"  # names the flag, on one line


def test_home_is_expanded(here):
    (here / "x").write_text("text", encoding="utf-8")
    check_local_path("--model_name_or_path", "~/x")  # ~/x is here/x: found


@pytest.mark.parametrize("name", ["user/dataset", "openai-community/gpt2", "gpt2", "user/data.v2"])
def test_other_names_are_hub_ids(here, name):
    assert not is_local_path(name)
    check_local_path("--dataset_name", name)  # a Hub id is not checked on disk


@pytest.mark.parametrize("name", [None, ""])
def test_no_name_is_not_checked(name):
    check_local_path("--eval_file", name)
