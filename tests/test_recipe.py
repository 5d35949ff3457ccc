"""Tests of hf_scratchgpt/recipe.py: YAML files and flags into typed arguments, checks before work, seeding."""

import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from hf_scratchgpt.recipe import (
    check_paths, final_evaluation, finish_recipe, given_settings, parse_recipe_args, start_recipe,
)


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
        ("model:\n  name: [unclosed\n", r"line 3, column 1: not valid YAML \(expected ',' or '\]', but got"),
    ],
)
def test_bad_config_files_are_named(tmp_path, content, message):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    with pytest.raises(ValueError, match=f"bad.yaml: {message}"):
        parse_recipe_args((Model, Train), ["--config", str(config)])


@dataclass
class Data:
    train_file: list[str] | None = None


def test_a_list_setting_given_one_string_in_a_config_file_is_a_list_of_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  train_file: corpus.txt\n")
    (data,) = parse_recipe_args((Data,), ["--config", str(config)])
    assert data.train_file == ["corpus.txt"]
    config.write_text("data:\n  train_file: [a.txt, b.txt]\n")
    assert parse_recipe_args((Data,), ["--config", str(config)])[0].train_file == ["a.txt", "b.txt"]


def test_unknown_flag_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"unknown option\(s\): --emb_dimm 3"):
        parse_recipe_args((Model, Train), ["--emb_dimm", "3"])
    with pytest.raises(FileNotFoundError, match="config file .*nope.yaml does not exist"):
        parse_recipe_args((Model, Train), ["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.slow
def test_run_recipe_prints_one_line_and_exits_2(tmp_path):
    script = tmp_path / "recipe.py"
    script.write_text(textwrap.dedent("""
        from hf_scratchgpt.recipe import run_recipe
        def main():
            raise ValueError("the corpus is empty")
        run_recipe(main)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == "error: the corpus is empty\n"


def test_given_settings_are_the_flags_and_the_users_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  emb_dim: 64\ntrain:\n  lr: 0.5\n")
    known = {"emb_dim", "name", "lr", "shuffle"}
    given = given_settings(["--config", str(config), "--name=big", "--no_shuffle"], known)
    assert given == {"emb_dim", "lr", "name", "shuffle"}
    assert given_settings(["--lr", "0.1"], known) == {"lr"}  # a recipe's default config is not the user's choice


@dataclass
class Paths:
    PATHS: ClassVar[dict] = {"data": "local", "model": "hub"}

    data: list[str] | None = None
    model: str | None = None


def test_check_paths_tells_missing_files_and_lets_hub_ids_through(tmp_path):
    present = tmp_path / "a.txt"
    present.write_text("x")
    check_paths(Paths(data=[str(present)], model="openai-community/gpt2"))  # a Hub id is not looked for on disk
    check_paths(Paths())
    with pytest.raises(FileNotFoundError, match=r"^--data nope: no such file or folder$"):
        check_paths(Paths(data=[str(present), "nope"]))
    with pytest.raises(FileNotFoundError, match=r"^--model ./gone: no such file or folder$"):
        check_paths(Paths(model="./gone"))


def test_start_recipe_seeds_before_the_recipe_builds_anything(tmp_path):
    def first_weights(*flags) -> torch.Tensor:
        start_recipe("test", (Model,), ["--output_dir", str(tmp_path), "--report_to", "none", *flags])
        return torch.nn.Linear(4, 4).weight

    assert torch.equal(first_weights("--seed", "3"), first_weights("--seed", "3"))
    assert not torch.equal(first_weights("--seed", "3"), first_weights("--seed", "4"))


def test_start_recipe_refuses_the_checkpoints_of_an_unfinished_run_and_a_folder_not_a_checkpoint(tmp_path):
    def start(*flags):
        return start_recipe("test", (Model,), ["--output_dir", str(tmp_path), *flags])

    (tmp_path / "checkpoint-3").mkdir()  # a crash while saving the first checkpoint
    with pytest.raises(ValueError, match=r"did not finish \(none saved whole, nothing to resume\): pass "
                                         r"--overwrite_output_dir to start over"):
        start()
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint last: none saved whole in"):
        start("--resume_from_checkpoint", "last")
    with pytest.raises(ValueError, match=r"checkpoint-3 is not a checkpoint: it has no trainer_state.json"):
        start("--resume_from_checkpoint", str(tmp_path / "checkpoint-3"))
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-6").mkdir()  # a crash while saving the second: `last` is the last one saved whole
    with pytest.raises(ValueError, match=r"did not finish \(checkpoint-3\): pass --resume_from_checkpoint last"):
        start()
    assert start("--resume_from_checkpoint", "last").checkpoint == str(tmp_path / "checkpoint-3")
    assert (tmp_path / "checkpoint-3").is_dir() and (tmp_path / "checkpoint-6").is_dir()
    run = start("--overwrite_output_dir", "true")  # starting over: the old run's checkpoints go
    assert run.checkpoint is None and not list(tmp_path.glob("checkpoint-*"))


def test_start_recipe_refuses_an_output_dir_holding_a_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a model"):
        start_recipe("test", (Model,), ["--output_dir", str(tmp_path)])
    run = start_recipe("test", (Model,), ["--output_dir", str(tmp_path), "--overwrite_output_dir", "true"])
    assert run.common.overwrite_output_dir and run.checkpoint is None and run.args[0].emb_dim == 8


@pytest.mark.parametrize("error", [
    RuntimeError("Error(s) in loading state_dict for ScratchGPTForCausalLM:\n\tsize mismatch for lm_head.weight"),
    ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group"),
])
def test_a_checkpoint_of_another_model_is_one_line_naming_it(tmp_path, error):
    class Trainer:
        def train(self, resume_from_checkpoint):
            raise error

    run = SimpleNamespace(checkpoint=str(tmp_path / "checkpoint-3"), common=SimpleNamespace(space_app=False))
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .*checkpoint-3 holds the state of another model"
                                         r" or recipe \((Error\(s\) in loading|loaded state dict)") as raised:
        finish_recipe(Trainer(), run)
    assert "\n" not in str(raised.value)
    run.checkpoint = None  # not resuming: the error is not ours to explain
    with pytest.raises(type(error), match=re.escape(str(error).splitlines()[0])):
        finish_recipe(Trainer(), run)


class FakeTrainer:
    """What final_evaluation reads of a Trainer: its log history, step, arguments, and evaluate()."""

    def __init__(self, log_history, global_step, load_best_model_at_end=False):
        self.state = SimpleNamespace(log_history=log_history, global_step=global_step)
        self.args = SimpleNamespace(load_best_model_at_end=load_best_model_at_end)
        self.evaluations = 0

    def evaluate(self):
        self.evaluations += 1
        return {"eval_loss": 1.0}


@pytest.mark.parametrize(
    "history, step, best, evaluated",
    [
        ([{"eval_loss": 2.0, "step": 4}, {"train_loss": 3.0, "step": 4}], 4, False, 0),  # ran at the last step
        ([{"eval_loss": 2.0, "step": 3}, {"loss": 3.0, "step": 4}], 4, False, 1),  # not at the last step
        ([{"loss": 3.0, "step": 4}], 4, False, 1),  # never (eval_strategy "no")
        ([{"eval_loss": 2.0, "step": 4}], 4, True, 1),  # the best checkpoint, loaded at the end, is another model
    ],
)
def test_the_final_evaluation_runs_once(history, step, best, evaluated):
    trainer = FakeTrainer(history, step, best)
    metrics = final_evaluation(trainer)
    assert trainer.evaluations == evaluated
    assert metrics == ({"eval_loss": 1.0} if evaluated else {"eval_loss": 2.0})
