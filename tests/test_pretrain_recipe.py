"""Tests of recipes/pretrain.py: a few steps end to end, two processes, resuming, and bad input."""

import hashlib
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

from hf_scratchgpt import ScratchGPTConfig
from hf_scratchgpt.data import default_corpus, split_corpus
from hf_scratchgpt.tokenization import gpt2_tokenizer_from_dir, train_bpe_tokenizer
from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "pretrain.py"
RECORD_WINDOWS = ROOT / "tests" / "record_windows.py"  # runs the recipe, recording each process' windows


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
    with pytest.raises(ValueError, match=r"holds the checkpoints of a run that did not finish \(checkpoint-3\)"):
        pretrain.main(tiny_args(corpus_file, stopped))  # starting over would write over them
    with pytest.raises(ValueError, match=r"--emb_dim 64 does not fit the checkpoint resumed, .*emb_dim 32"):
        pretrain.main(tiny_args(corpus_file, stopped, "--emb_dim", "64", "--resume_from_checkpoint", "last"))
    # The README's form: the run's settings, not its model's shape, which comes from the checkpoint.
    pretrain.main(run_args(corpus_file, stopped, "--resume_from_checkpoint", "last"))
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
        (["--streaming", "true", "--max_steps", "-1"], r"--streaming needs --max_steps"),
        (["--max_eval_samples", "0"], r"--max_eval_samples must be at least 1, got 0"),
        (["--validation_split", "test"], r"--validation_split names a split of --dataset_name"),
        (["--validation_fraction", "1.5"],
         r"--validation_fraction must be between 0 and 1 \(both excluded\), got 1.5"),
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


def test_a_preset_gives_its_shape_and_flags_override_it(corpus_file, tmp_path):
    out = tmp_path / "out"
    pretrain.main(run_args(corpus_file, out, "--preset", "tiny", "--n_layers", "3", "--vocab_size", "300",
                           "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no"))
    config, tiny = json.loads((out / "config.json").read_text()), ScratchGPTConfig.from_preset("tiny")
    assert (config["emb_dim"], config["n_heads"], config["context_length"]) == (tiny.emb_dim, tiny.n_heads,
                                                                                 tiny.context_length)
    assert config["n_layers"] == 3 != tiny.n_layers  # the recipe's default config has 4


@pytest.mark.slow
def test_output_dir_holding_a_model_is_refused(corpus_file, tmp_path):
    out = tmp_path / "out"
    pretrain.main(tiny_args(corpus_file, out, "--max_steps", "1"))
    with pytest.raises(ValueError, match="already holds a model .* --overwrite_output_dir"):
        pretrain.main(tiny_args(corpus_file, out, "--max_steps", "1"))
    pretrain.main(tiny_args(corpus_file, out, "--max_steps", "1", "--overwrite_output_dir", "true"))


# ----------------------------------------------------------------------------------------------------------
# Corpora past memory: token ids on disk, streaming, bounded evaluation, several processes and machines


def test_a_rerun_reuses_the_token_ids_and_a_new_tokenizer_does_not(corpus_file, tmp_path, capsys):
    cache = ["--data_cache_dir", str(tmp_path / "tokens"), "--max_steps", "1", "--eval_strategy", "no"]
    pretrain.main(tiny_args(corpus_file, tmp_path / "first", *cache))
    assert "(tokenized now)" in capsys.readouterr().out
    pretrain.main(tiny_args(corpus_file, tmp_path / "again", *cache))  # the same BPE vocabulary, trained again
    again = capsys.readouterr().out
    assert "(reused)" in again and "tokenized now" not in again
    pretrain.main(tiny_args(corpus_file, tmp_path / "context", *cache, "--context_length", "16"))
    assert "windows of 16 tokens" in (context := capsys.readouterr().out) and "(reused)" in context
    pretrain.main(tiny_args(corpus_file, tmp_path / "vocab", *cache, "--vocab_size", "320"))
    assert "(tokenized now)" in capsys.readouterr().out
    stores = sorted(path.name for path in (tmp_path / "tokens").iterdir())
    assert len(stores) == 4 and all("building" not in name for name in stores)  # 2 tokenizers x 2 splits, all whole


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_max_eval_samples_bounds_the_one_final_evaluation(corpus_file, tmp_path, monkeypatch, streaming):
    evaluated = []
    prediction_step = pretrain.ScratchGPTTrainer.prediction_step

    def counting_step(self, model, inputs, *args, **kwargs):
        evaluated.append(len(inputs["input_ids"]))
        return prediction_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(pretrain.ScratchGPTTrainer, "prediction_step", counting_step)
    out = tmp_path / "run"
    metrics = pretrain.main(tiny_args(corpus_file, out, "--max_eval_samples", "3", "--per_device_eval_batch_size", "2",
                                      "--max_steps", "4", "--eval_steps", "3", "--streaming", streaming))
    # Evaluations at step 3 and at the last step, 4: 3 windows each, in batches of 2; no third one after training.
    assert evaluated == [2, 1, 2, 1]
    state = json.loads((out / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "eval_loss" in entry] == [3, 4]
    assert metrics["eval_loss"] == state["log_history"][-2]["eval_loss"]


def first_windows_of_the_run(out: Path, corpus_file: Path, length: int, count: int) -> list[list[int]]:
    """The first training windows of a run's corpus, tokenized whole with the tokenizer the run saved."""
    tokenizer = gpt2_tokenizer_from_dir(out)
    ids = tokenizer(split_corpus(corpus_file)["train"]["text"][0], add_special_tokens=False)["input_ids"]
    return [ids[start : start + length] for start in range(0, length * count, length)]


@pytest.mark.slow
def test_streaming_trains_on_the_windows_of_the_stored_ids_in_order(corpus_file, tmp_path, monkeypatch):
    seen = []
    training_step = pretrain.ScratchGPTTrainer.training_step

    def recording_step(self, model, inputs, *args, **kwargs):
        seen.extend(inputs["input_ids"].tolist())
        return training_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(pretrain.ScratchGPTTrainer, "training_step", recording_step)
    out = tmp_path / "stream"
    pretrain.main(tiny_args(corpus_file, out, "--streaming", "true", "--max_steps", "2", "--eval_strategy", "no"))
    assert seen == first_windows_of_the_run(out, corpus_file, 32, 8)  # a stream is read in order, not shuffled


@pytest.mark.slow
def test_resumed_streaming_run_ends_with_the_weights_of_an_uninterrupted_run(corpus_file, tmp_path):
    streaming = ["--streaming", "true", "--max_eval_samples", "4"]
    full = tmp_path / "full"
    pretrain.main(tiny_args(corpus_file, full, *streaming))
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(full / "checkpoint-3", stopped / "checkpoint-3")
    pretrain.main(tiny_args(corpus_file, stopped, *streaming, "--resume_from_checkpoint", "last"))
    expected, resumed = load_file(full / "model.safetensors"), load_file(stopped / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0, msg=name)


def read_records(record_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(record_dir.glob("rank-*.json"))]


def run_two_processes(tmp_path: Path, flags: list[str]) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """The recipe with `flags` in two processes under torchrun, one thread each; what each recorded."""
    records = tmp_path / "records"
    records.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(RECORD_WINDOWS), str(records), *flags],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, read_records(records)


@pytest.mark.slow
def test_two_processes_train_on_disjoint_windows_that_cover_the_epoch(corpus_file, shared_data, tmp_path):
    # A corpus whose training windows fill whole steps of 2 processes x 4 windows: no window is repeated to pad.
    gpt2 = gpt2_tokenizer_from_dir(shared_data / "gpt2")
    text = corpus_file.read_text()[:12_000]
    while len(range(0, len(gpt2.encode(split_corpus([text])["train"]["text"][0])) - 32, 32)) % 8:
        text = text[:-50]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    out = tmp_path / "ddp"
    flags = tiny_args(corpus, out, "--tokenizer", str(shared_data / "gpt2"), "--max_steps", "-1", "--num_train_epochs",
                      "1", "--eval_strategy", "no", "--save_strategy", "no")
    result, (first, second) = run_two_processes(tmp_path, flags)
    assert (first["rank"], second["rank"]) == (0, 1)
    assert not {tuple(w) for w in first["windows"]} & {tuple(w) for w in second["windows"]}
    expected = first_windows_of_the_run(out, corpus, 32, len(first["windows"]) + len(second["windows"]))
    assert sorted(first["windows"] + second["windows"]) == sorted(expected)
    assert result.stdout.count("(tokenized now)") == 1 and result.stdout.count("(reused)") == 1


@pytest.mark.slow
def test_two_processes_stream_their_own_share(corpus_file, tmp_path):
    out = tmp_path / "stream"
    flags = tiny_args(corpus_file, out, "--streaming", "true", "--max_steps", "3", "--eval_strategy", "no",
                      "--max_eval_samples", "4", "--save_strategy", "no")
    _, (first, second) = run_two_processes(tmp_path, flags)
    assert len(first["windows"]) == len(second["windows"]) == 3 * 4
    # Together, the first 24 windows of the stream, each once: accelerate sends each process its own batches.
    assert sorted(first["windows"] + second["windows"]) == sorted(first_windows_of_the_run(out, corpus_file, 32, 24))


@pytest.mark.slow
def test_two_machines_share_the_tokenizer_and_the_token_ids(corpus_file, tmp_path):
    """Two nodes of one process each, as `torchrun --nnodes 2` starts them on two machines, sharing a filesystem.

    The tokenizer is trained here: node 1 must wait for the global main process (on node 0) to save it.
    """
    out, records = tmp_path / "nodes", tmp_path / "records"
    records.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    port = free_port()
    flags = tiny_args(corpus_file, out, "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2",
                      "--max_eval_samples", "4")
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
             str(RECORD_WINDOWS), str(records), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    first, second = read_records(records)
    assert first["tokenizer"] == second["tokenizer"]
    saved = gpt2_tokenizer_from_dir(out).backend_tokenizer.to_str()
    assert first["tokenizer"] == hashlib.sha256(saved.encode()).hexdigest()
    assert not {tuple(w) for w in first["windows"]} & {tuple(w) for w in second["windows"]}
    lines = [next(line for line in stdout.splitlines() if line.startswith("data (process")) for stdout, _ in outputs]
    assert "(tokenized now)" in lines[0] and "(reused)" in lines[1]
    assert lines[0].split(": ", 1)[1].split(" (")[0] == lines[1].split(": ", 1)[1].split(" (")[0]  # the same store
