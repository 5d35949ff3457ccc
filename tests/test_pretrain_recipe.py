"""Tests of recipes/pretrain.py: a few steps end to end, two processes, resuming, and bad input."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from hf_scratchgpt.data import default_corpus
from hf_scratchgpt.tokenization import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "pretrain.py"


def load_recipe():
    spec = importlib.util.spec_from_file_location("pretrain_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretrain = load_recipe()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    """About 40,000 characters of English from the embedded corpus."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(default_corpus()[:12])[:40_000])
    return path


def run_args(corpus_file, output_dir, *extra) -> list[str]:
    """A short run: settings of the run, not of the model's shape."""
    return [
        "--train_file", str(corpus_file), "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--max_steps", "6", "--eval_steps", "3", "--save_steps", "3", "--logging_steps", "1", "--warmup_steps", "2",
        "--sample_max_new_tokens", "5", "--tensorboard", "false", "--disable_tqdm", "true",
        *extra,
    ]


def tiny_args(corpus_file, output_dir, *extra) -> list[str]:
    """A short run of a new, tiny model."""
    shape = ["--context_length", "32", "--emb_dim", "32", "--n_layers", "2", "--n_heads", "2", "--vocab_size", "300"]
    return run_args(corpus_file, output_dir, *shape, *extra)


@pytest.fixture(scope="module")
def small_model(corpus_file, tmp_path_factory) -> Path:
    """A tiny model pretrained for one step, with its 300-token BPE tokenizer, to continue from."""
    out = tmp_path_factory.mktemp("small") / "model"
    pretrain.main(tiny_args(corpus_file, out, "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no"))
    return out


def test_a_few_steps_save_a_complete_hub_folder(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = pretrain.main(tiny_args(corpus_file, out))
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-4)
    for name in ("model.safetensors", "config.json", "modeling_scratchgpt.py", "configuration_scratchgpt.py",
                 "tokenizer.json", "generation_config.json", "README.md", "loss.png", "checkpoint-6"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_scratchgpt.ScratchGPTForCausalLM"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: \"transformers\"") and "eval_loss" in card
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer) == 300
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("The for statement", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5
    generator = pipeline("text-generation", model=str(out))
    text = generator("The for statement", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text == tokenizer.decode(generated[0])
    assert "[step 3]" in capsys.readouterr().out  # the sample printed at evaluation


@pytest.mark.slow
def test_two_processes_both_take_part(corpus_file, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(RECIPE), *tiny_args(corpus_file, out, "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of world size 2" in result.stdout and "process 1 of world size 2" in result.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    # Two processes with 4 windows each: each step consumes 8 windows of 32 tokens.
    assert state["num_input_tokens_seen"] == 2 * 2 * 4 * 32
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), torch.nn.Module)


@pytest.mark.slow
def test_runs_under_accelerate_launch(corpus_file, tmp_path):
    out = tmp_path / "accelerate"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no",
         str(RECIPE), *tiny_args(corpus_file, out, "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of world size 1" in result.stdout
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


@pytest.mark.slow
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(corpus_file, tmp_path):
    full = tmp_path / "full"
    pretrain.main(tiny_args(corpus_file, full))
    # A run stopped after its first checkpoint leaves exactly this behind: the folder with checkpoint-3.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(full / "checkpoint-3", stopped / "checkpoint-3")
    pretrain.main(tiny_args(corpus_file, stopped, "--resume_from_checkpoint", "last"))
    expected, resumed = load_file(full / "model.safetensors"), load_file(stopped / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_bad_input_is_one_line_before_training(corpus_file, tmp_path):
    result = subprocess.run(
        [sys.executable, str(RECIPE), "--train_file", str(tmp_path / "missing.txt"), "--output_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --train_file {tmp_path / 'missing.txt'}: no such file or folder"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--context_length", "512", "--max_position_embeddings_typo", "1"], r"unknown option\(s\): --max_position"),
        (["--per_device_train_batch_size", "4096"], r"the training data gives \d+ windows of 32 tokens, fewer than one batch of 4096"),
        (["--train_file", "nowhere.txt"], r"--train_file nowhere.txt: no such file or folder"),
        (["--sample_prompt", ""], r"--sample_prompt is empty"),
        (["--resume_from_checkpoint", "last"], r"no checkpoint-\* folder in"),
    ],
)
def test_bad_flags_raise_before_training(corpus_file, tmp_path, extra, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        pretrain.main(tiny_args(corpus_file, tmp_path / "out", *extra))
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_missing_model_to_continue_fails_before_any_work(corpus_file, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--model_name_or_path ./no-such-model: no such file or folder"):
        pretrain.main(tiny_args(corpus_file, tmp_path / "out", "--model_name_or_path", "./no-such-model"))
    assert not (tmp_path / "out" / "tokenizer.json").exists()  # not even the tokenizer was trained


def test_corpus_smaller_than_one_window(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("A corpus of a few words only. " * 20)
    with pytest.raises(ValueError, match=r"has \d+ tokens, fewer than one window needs: 33"):
        pretrain.main(tiny_args(small, tmp_path / "out"))


def test_continuing_a_model_with_a_bigger_tokenizer_is_refused(corpus_file, small_model, tmp_path):
    bigger = tmp_path / "tokenizer-400"
    train_bpe_tokenizer(corpus_file, 400).save_pretrained(bigger)
    with pytest.raises(ValueError, match=r"the tokenizer has 400 tokens, more than the vocabulary .* \(300\)"):
        pretrain.main(run_args(corpus_file, tmp_path / "out", "--model_name_or_path", str(small_model),
                               "--tokenizer", str(bigger)))


def test_continuing_keeps_the_models_own_tokenizer(small_model, tmp_path):
    other = tmp_path / "other.txt"  # a corpus whose own BPE vocabulary would differ from the model's
    other.write_text("\n".join(default_corpus()[40:52])[:40_000])
    out = tmp_path / "continued"
    pretrain.main(run_args(other, out, "--model_name_or_path", str(small_model), "--max_steps", "1",
                           "--eval_strategy", "no", "--save_strategy", "no"))
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(small_model).get_vocab()
    assert json.loads((out / "config.json").read_text())["emb_dim"] == 32  # the model's shape, not default.yaml's


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--emb_dim", "64"], r"--emb_dim cannot apply to --model_name_or_path .*its own shape"),
        (["--context_length", "16"], r"--context_length cannot apply"),
        (["--vocab_size", "400"], r"--vocab_size cannot apply"),
        (["--tokenizer", "bpe"], r"--tokenizer bpe trains a new vocabulary"),
    ],
)
def test_settings_for_a_new_model_are_refused_when_continuing(corpus_file, small_model, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        pretrain.main(run_args(corpus_file, tmp_path / "out", "--model_name_or_path", str(small_model), *flags))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_same_seed_gives_the_same_starting_weights(corpus_file, tmp_path):
    def starting_weights(seed: str, name: str) -> dict:
        out = tmp_path / name  # learning rate 0: the saved weights are the ones the model started with
        pretrain.main(tiny_args(corpus_file, out, "--seed", seed, "--max_steps", "1", "--learning_rate", "0",
                                "--eval_strategy", "no", "--save_strategy", "no"))
        return load_file(out / "model.safetensors")

    first, again, other = starting_weights("5", "a"), starting_weights("5", "b"), starting_weights("6", "c")
    for name in first:
        assert torch.equal(first[name], again[name]), name
    assert not torch.equal(first["model.tok_emb.weight"], other["model.tok_emb.weight"])


def test_unknown_config_key_is_named(corpus_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  emb_dim: 32\n  n_layerz: 2\ntraining:\n  learning_rate: 1.0e-3\n")
    with pytest.raises(ValueError, match=r"run.yaml: unknown config key\(s\): model.n_layerz"):
        pretrain.main(["--config", str(config), *tiny_args(corpus_file, tmp_path / "out")])


@pytest.mark.slow
def test_config_file_values_are_used_and_flags_win(corpus_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  n_layers: 3\ntraining:\n  learning_rate: 0.5\n  seed: 7\n")
    out = tmp_path / "out"
    pretrain.main(["--config", str(config), *tiny_args(corpus_file, out, "--max_steps", "1", "--seed", "9")])
    assert json.loads((out / "config.json").read_text())["n_layers"] == 2  # the flag in tiny_args wins
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert (args.learning_rate, args.seed) == (0.5, 9)


@pytest.mark.slow
def test_output_dir_holding_a_model_is_refused(corpus_file, tmp_path):
    out = tmp_path / "out"
    pretrain.main(tiny_args(corpus_file, out, "--max_steps", "1"))
    with pytest.raises(ValueError, match="already holds a model .* --overwrite_output_dir"):
        pretrain.main(tiny_args(corpus_file, out, "--max_steps", "1"))
    pretrain.main(tiny_args(corpus_file, out, "--max_steps", "1", "--overwrite_output_dir", "true"))
