"""Tests of hf_scratchgpt/arguments.py: YAML files and flags into typed recipe arguments."""

import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from hf_scratchgpt.arguments import parse_recipe_args


@dataclass
class Model:
    emb_dim: int = 8
    name: str = "tiny"


@dataclass
class Train:
    lr: float = 0.1
    shuffle: bool = True


def test_sections_are_flattened_and_flags_win(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  emb_dim: 64\n  name: big\ntrain:\n  lr: 0.5\n  shuffle: false\n")
    model, train = parse_recipe_args((Model, Train), ["--config", str(config), "--emb_dim", "32"])
    assert (model.emb_dim, model.name, train.lr, train.shuffle) == (32, "big", 0.5, False)


def test_precedence_defaults_then_default_config_then_flags(tmp_path):
    config = tmp_path / "default.yaml"
    config.write_text("lr: 0.25\n")
    model, train = parse_recipe_args((Model, Train), [], default_config=config, defaults={"lr": 0.9, "emb_dim": 4})
    assert (model.emb_dim, train.lr) == (4, 0.25)
    _, train = parse_recipe_args((Model, Train), ["--lr=0.3"], default_config=config)
    assert train.lr == 0.3


@pytest.mark.parametrize(
    "content, message",
    [
        ("model:\n  emb_dimm: 3\n", r"unknown config key\(s\): model.emb_dimm"),
        ("colour: red\n", r"unknown config key\(s\): colour"),
        ("- a list\n", "expected a mapping of settings"),
    ],
)
def test_bad_config_files_are_named(tmp_path, content, message):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    with pytest.raises(ValueError, match=f"bad.yaml: {message}"):
        parse_recipe_args((Model, Train), ["--config", str(config)])


def test_unknown_flag_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"unknown option\(s\): --emb_dimm 3"):
        parse_recipe_args((Model, Train), ["--emb_dimm", "3"])
    with pytest.raises(FileNotFoundError, match="config file .*nope.yaml does not exist"):
        parse_recipe_args((Model, Train), ["--config", str(tmp_path / "nope.yaml")])


def test_run_recipe_prints_one_line_and_exits_2(tmp_path):
    script = tmp_path / "recipe.py"
    script.write_text(textwrap.dedent("""
        from hf_scratchgpt.arguments import run_recipe
        def main():
            raise ValueError("the corpus is empty")
        run_recipe(main)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == "error: the corpus is empty\n"
