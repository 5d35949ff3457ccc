"""Tests of hf_scratchgpt/generate.py: the command line that samples from a saved model."""

import subprocess
import sys
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM
from hf_scratchgpt.data import default_corpus
from hf_scratchgpt.generate import generate_text
from hf_scratchgpt.tokenization import train_bpe_tokenizer


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tokenizer = train_bpe_tokenizer(default_corpus()[:5], vocab_size=300)
    torch.manual_seed(0)
    config = ScratchGPTConfig.from_preset("tiny", vocab_size=len(tokenizer), eos_token_id=None, bos_token_id=None)
    ScratchGPTForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


def test_greedy_generation_streams_the_models_greedy_tokens(saved_model, capsys):
    folder, tokenizer = saved_model
    text = generate_text([str(folder), "--prompt", "The for statement", "--max_new_tokens", "8", "--temperature", "0"])
    model = ScratchGPTForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer("The for statement", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert text == tokenizer.decode(expected[0])
    assert capsys.readouterr().out.strip() == text.strip()  # streamed to the terminal as it came


def test_bfloat16_weights_generate_the_bfloat16_models_tokens(saved_model, capsys):
    folder, tokenizer = saved_model
    flags = ["--prompt", "The for statement", "--max_new_tokens", "8", "--temperature", "0", "--dtype", "bfloat16"]
    loaded = []
    load = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        loaded.append(load(*args, **kwargs))
        return loaded[-1]

    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", spy):
        text = generate_text([str(folder), *flags])
    assert {param.dtype for param in loaded[0].parameters()} == {torch.bfloat16}
    model = ScratchGPTForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = tokenizer("The for statement", return_tensors="pt").input_ids
    assert text == tokenizer.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0])


def test_sampling_is_reproducible_with_a_seed_and_varies_without(saved_model, capsys):
    folder, _ = saved_model
    flags = [str(folder), "--max_new_tokens", "12", "--temperature", "1.5", "--top_k", "0", "--top_p", "1.0"]
    first, second = generate_text([*flags, "--seed", "3"]), generate_text([*flags, "--seed", "3"])
    assert first == second
    assert len({generate_text([*flags, "--seed", str(seed)]) for seed in range(4)}) > 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top_p", "0"], "--top_p must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--max_new_tokens", "0"], "--max_new_tokens must be positive"),
        (["--prompt", ""], "--prompt is empty"),
    ],
)
def test_bad_flags_are_one_line_errors(saved_model, capsys, flags, message):
    folder, _ = saved_model
    with pytest.raises(SystemExit) as exit_info:
        generate_text([str(folder), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(SystemExit, match=f"no model folder {tmp_path / 'nope'}"):
        generate_text([str(tmp_path / "nope")])


def test_a_folder_without_a_model_is_named(tmp_path):
    with pytest.raises(SystemExit, match=f"{tmp_path} holds no model \\(no config.json\\)"):
        generate_text([str(tmp_path)])


def test_a_folder_without_a_tokenizer_is_one_line(saved_model, tmp_path):
    folder, _ = saved_model
    ScratchGPTForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "weights-only")
    with pytest.raises(SystemExit, match=f"cannot load {tmp_path / 'weights-only'}: ") as error:
        generate_text([str(tmp_path / "weights-only")])
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_the_console_command_exits_0_and_prints_the_text_once(saved_model):
    folder, _ = saved_model
    # What pip's `scratchgpt-generate` wrapper runs: sys.exit(main()).
    script = "import sys; from hf_scratchgpt.generate import main; sys.exit(main())"
    flags = [str(folder), "--prompt", "The for statement", "--max_new_tokens", "6", "--temperature", "0"]
    result = subprocess.run([sys.executable, "-c", script, *flags], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("The for statement") == 1
    assert "The for statement" not in result.stderr
