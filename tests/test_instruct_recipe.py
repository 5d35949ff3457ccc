"""Tests of recipes/instruct.py and hf_scratchgpt/responses.py: the book's chapter 7, instruction fine-tuning."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM
from hf_scratchgpt.data.instruction import add_chat_template, render_prompt
from hf_scratchgpt.judge import JudgeUnavailable
from hf_scratchgpt.responses import answer_instructions, score_responses
from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "instruct.py"

spec = importlib.util.spec_from_file_location("instruct_recipe", RECIPE)
instruct = importlib.util.module_from_spec(spec)
spec.loader.exec_module(instruct)


@pytest.fixture(scope="module")
def book_data(shared_data) -> Path:
    return shared_data / "instruction" / "instruction-data.json"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, gpt2) -> Path:
    """A small untrained ScratchGPT with GPT-2's tokenizer, saved as recipes/pretrain.py saves one."""
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    config = ScratchGPTConfig.from_preset(
        "tiny", vocab_size=50257, context_length=256, bos_token_id=50256, eos_token_id=50256, drop_rate=0.0
    )
    ScratchGPTForCausalLM(config).save_pretrained(folder)
    gpt2.save_pretrained(folder)
    return folder


def run_args(model, data, out, *extra) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--train_file", str(data), "--output_dir", str(out),
        "--max_steps", "4", "--eval_steps", "4", "--save_steps", "4", "--logging_steps", "1",
        "--learning_rate", "3e-3", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
        "--max_length", "256", "--max_new_tokens", "6", "--report_to", "none", "--tensorboard", "false",
        "--disable_tqdm", "true", *extra,
    ]


def small_split(tmp_path, book_data, name: str, rows: slice) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(json.loads(book_data.read_text())[rows]))
    return path


@pytest.mark.slow
def test_a_short_run_on_the_books_data_answers_every_test_instruction(base_model, book_data, tmp_path):
    out = tmp_path / "run"
    metrics = instruct.main(run_args(base_model, book_data, out))
    assert metrics["eval_loss"] < metrics["base_loss"]  # the validation loss fell
    answered = json.loads((out / "test-responses.json").read_text())
    book = json.loads(book_data.read_text())
    assert len(answered) == 110
    assert [entry["instruction"] for entry in answered] == [entry["instruction"] for entry in book[935:1045]]
    assert all(isinstance(entry["model_response"], str) and "### Response:" not in entry["model_response"]
               for entry in answered)
    saved = json.loads((out / "metrics.json").read_text())
    for name in ("test_rouge_l", "test_exact_match", "test_stop_rate", "test_mean_response_words", "eval_loss"):
        assert saved[name] == pytest.approx(metrics[name]), name
    assert "test_rouge_l" in (out / "README.md").read_text()  # the scores are in the model card

    # The saved folder carries the chat template; pipeline answers a list of messages with the model's reply.
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (out / "chat_template.jinja").exists()
    entry = book[1000]
    messages = [{"role": "user", "content": entry["instruction"] + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "")}]
    template_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert template_ids == tokenizer(render_prompt(entry), add_special_tokens=False).input_ids
    chat = pipeline("text-generation", model=str(out))(messages, max_new_tokens=5, do_sample=False)
    reply = chat[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--packing", "true"], ["--mask_prompt", "true"], ["--trainable", "lora"]])
def test_packing_prompt_masking_and_lora_runs_learn(base_model, book_data, tmp_path, flags):
    out = tmp_path / "run"
    test = small_split(tmp_path, book_data, "test", slice(1045, 1050))
    validation = small_split(tmp_path, book_data, "validation", slice(1050, 1070))
    metrics = instruct.main(run_args(base_model, book_data, out, "--validation_file", str(validation),
                                     "--test_file", str(test), *flags))
    assert metrics["eval_loss"] < metrics["base_loss"]
    assert len(json.loads((out / "test-responses.json").read_text())) == 5  # the given test file, not the split
    assert not (out / "adapter_config.json").exists()  # LoRA is merged: an ordinary model


def test_answers_stop_at_end_of_text_and_drop_the_header(base_model, gpt2):
    model = AutoModelForCausalLM.from_pretrained(base_model)
    tokenizer = add_chat_template(AutoTokenizer.from_pretrained(base_model))
    entries = [{"instruction": "Say hi.", "input": "", "output": "Hi."}, {"instruction": "Add.", "input": "1+1", "output": "2"}]
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit equal: greedy picks token 0 ...
    with torch.no_grad():
        model.lm_head.weight[gpt2.eos_token_id, 0] = 1.0  # ... unless eos wins: make eos the greedy token
        model.model.final_norm.bias.fill_(1.0)
        model.model.final_norm.weight.zero_()
    answered = answer_instructions(model, tokenizer, entries, max_new_tokens=5, batch_size=2)
    assert [a["stopped"] for a in answered] == [True, True] and [a["model_response"] for a in answered] == ["", ""]
    scores = score_responses(answered)
    assert scores["stop_rate"] == 1.0 and scores["rouge_l"] == 0.0 and scores["mean_response_words"] == 0.0


@pytest.mark.slow
def test_an_unreachable_judge_costs_nothing_already_done(base_model, book_data, tmp_path, capsys):
    out = tmp_path / "run"
    test = small_split(tmp_path, book_data, "test", slice(1045, 1048))
    metrics = instruct.main(run_args(base_model, book_data, out, "--test_file", str(test),
                                     "--judge_url", f"http://127.0.0.1:{free_port()}/v1", "--judge_model", "judge"))
    assert "judge skipped:" in capsys.readouterr().out
    assert "test_judge_mean_score" not in metrics and "test_rouge_l" in metrics
    assert len(json.loads((out / "test-responses.json").read_text())) == 3


@pytest.mark.slow
def test_the_judge_is_a_model_served_by_transformers_serve(base_model, book_data, tmp_path, gpt2):
    from test_export import served_model  # tests/ is on sys.path under pytest

    from hf_scratchgpt.export import export_to_gpt2

    judge = tmp_path / "judge-scratch"  # a judge with room for the book's judge prompt in its context
    torch.manual_seed(1)
    config = ScratchGPTConfig.from_preset("tiny", vocab_size=50257, context_length=1024, bos_token_id=50256,
                                          eos_token_id=50256)
    ScratchGPTForCausalLM(config).save_pretrained(judge)
    add_chat_template(gpt2).save_pretrained(judge)
    exported = export_to_gpt2(judge, tmp_path / "judge-gpt2")
    test = small_split(tmp_path, book_data, "test", slice(1045, 1048))
    with served_model(exported) as url:
        metrics = instruct.main(run_args(base_model, book_data, tmp_path / "run", "--test_file", str(test),
                                         "--judge_url", f"{url}/v1", "--judge_model", str(exported)))
    # A random judge rarely answers with a number: the 3 replies are scored (a mean) or counted as unparsed.
    assert 0 <= metrics["test_judge_unparsed"] <= 3
    assert metrics["test_judge_unparsed"] == 3 or 0 <= metrics["test_judge_mean_score"] <= 100


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"instruction": "a", "input": ""}]', r"entry 0: missing 'output'"),
        ("", r"empty"),
        ('[{"messages": [{"role": "robot", "content": "x"}]}]', r"entry 0, turn 0: unknown role 'robot'"),
        ('[{"instruction": "a", "input": "", "output": "b"}]',
         r"the training data gives 0 entries, fewer than one batch"),
    ],
)
def test_bad_data_is_one_line_before_training(base_model, tmp_path, content, message):
    data = tmp_path / "bad.json"
    data.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        instruct.main(run_args(base_model, data, tmp_path / "out"))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out" / "config.json").exists()


def test_a_judge_folder_that_holds_no_model_is_a_judge_that_does_not_answer(tmp_path):
    with pytest.raises(JudgeUnavailable, match=f"cannot load {tmp_path}: "):
        instruct._local_judge(str(tmp_path))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--judge_model_path", "./no-judge"], r"--judge_model_path ./no-judge: no such file or folder"),
        (["--max_new_tokens", "0"], r"--max_new_tokens must be at least 1 \(the test answers' tokens\), got 0"),
        (["--judge_url", "http://localhost:1/v1"], r"--judge_url needs --judge_model"),
    ],
)
def test_bad_flags_are_one_line_before_training(base_model, book_data, tmp_path, flags, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        instruct.main(run_args(base_model, book_data, tmp_path / "out", *flags))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.slow
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(base_model, book_data, tmp_path):
    test = small_split(tmp_path, book_data, "test", slice(1045, 1046))
    validation = small_split(tmp_path, book_data, "validation", slice(1000, 1004))
    args = ["--test_file", str(test), "--validation_file", str(validation), "--max_steps", "4", "--save_steps", "2",
            "--eval_strategy", "no"]
    full = instruct.main(run_args(base_model, book_data, tmp_path / "full", *args))
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    os.rename(tmp_path / "full" / "checkpoint-2", stopped / "checkpoint-2")
    again = instruct.main(run_args(base_model, book_data, stopped, *args, "--resume_from_checkpoint", "last"))
    expected, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(stopped / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0, msg=name)
    # The loss before tuning, measured by the first run only, is in both runs' metrics and cards.
    assert again["base_loss"] == full["base_loss"] and again["eval_loss"] == pytest.approx(full["eval_loss"])
    assert all("base_loss" in (folder / "README.md").read_text() for folder in (tmp_path / "full", stopped))


@pytest.mark.slow
def test_two_processes_train_together(base_model, book_data, tmp_path):
    test = small_split(tmp_path, book_data, "test", slice(1045, 1047))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RECIPE),
         *run_args(base_model, book_data, tmp_path / "ddp", "--test_file", str(test), "--max_steps", "2",
                   "--eval_strategy", "no", "--save_strategy", "no")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of world size 2" in result.stdout and "process 1 of world size 2" in result.stdout
    assert len(json.loads((tmp_path / "ddp" / "test-responses.json").read_text())) == 2
