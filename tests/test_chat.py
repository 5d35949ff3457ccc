"""Tests of hf_scratchgpt/chat.py: `scratchgpt-chat` in the terminal, driven through its stdin, and its refusals.

The model is a tiny random ScratchGPT with GPT-2's tokenizer and chapter 7's chat template: untrained, so the tests
check the mechanics (the ids sent to the model, the history, the cut), not the answers. `save_chat_model` and
`GenerateSpy` serve tests/test_app.py too.
"""

import io
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM, ScratchGPTForSequenceClassification
from hf_scratchgpt.chat import main
from hf_scratchgpt.data.instruction import add_chat_template


CONTEXT = 128
LABELS = ["ham", "spam"]


def save_chat_model(folder: Path, gpt2, *, chat_template: bool = True, classifier: bool = False,
                    context: int = CONTEXT, seed: int = 0) -> Path:
    """A tiny random ScratchGPT (or classifier) over GPT-2's vocabulary, saved with its tokenizer: with chapter
    7's chat template, as an instruction-tuned model is saved, or without, as a pretrained one."""
    gpt2.save_pretrained(folder)  # a copy: the session's tokenizer is shared and keeps no template
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if chat_template:
        add_chat_template(tokenizer)
    torch.manual_seed(seed)
    shape = dict(vocab_size=50257, context_length=context, bos_token_id=50256, eos_token_id=50256)
    if classifier:
        labels = dict(num_labels=2, id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)},
                      pad_token_id=50256)
        model = ScratchGPTForSequenceClassification(ScratchGPTConfig.from_preset("tiny", **shape, **labels))
    else:
        model = ScratchGPTForCausalLM(ScratchGPTConfig.from_preset("tiny", **shape))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class GenerateSpy:
    """Records the ids that each `generate()` call of ScratchGPTForCausalLM gets and returns."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[list[int], list[int]]] = []  # (prompt ids, generated ids after it)
        self.kwargs: list[dict] = []  # each call's keyword arguments
        generate = ScratchGPTForCausalLM.generate

        def spy(model, input_ids, *args, **kwargs):
            self.kwargs.append(kwargs)
            out = generate(model, input_ids, *args, **kwargs)
            self.calls.append((input_ids[0].tolist(), out[0, input_ids.shape[1]:].tolist()))
            return out

        monkeypatch.setattr(ScratchGPTForCausalLM, "generate", spy)

    @property
    def prompts(self) -> list[list[int]]:
        return [prompt for prompt, _ in self.calls]

    def reply(self, tokenizer, i: int) -> str:
        return tokenizer.decode(self.calls[i][1], skip_special_tokens=True)


def template_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, gpt2) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("instruct"), gpt2)


@pytest.fixture(scope="module")
def tokenizer(chat_model):
    return AutoTokenizer.from_pretrained(chat_model)


def chat(monkeypatch, capsys, argv: list[str], lines: list[str]) -> str:
    """Run `scratchgpt-chat argv` with `lines` on its stdin; what it printed."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    capsys.readouterr()
    assert main(argv) is None
    return capsys.readouterr().out


GREEDY = ["--temperature", "0", "--max_new_tokens", "8"]


# ---------------------------------------------------------------------------------------------------------------
# Conversations


def test_two_turns_the_second_prompt_holds_the_first_turn(chat_model, tokenizer, monkeypatch, capsys):
    spy = GenerateSpy(monkeypatch)
    out = chat(monkeypatch, capsys, [str(chat_model), *GREEDY], ["Name a colour.", "And another one?", "/exit"])
    assert len(spy.calls) == 2
    first = spy.reply(tokenizer, 0)
    assert spy.prompts[0] == template_ids(tokenizer, [user("Name a colour.")])
    assert spy.prompts[1] == template_ids(tokenizer, [user("Name a colour."), assistant(first),
                                                      user("And another one?")])
    assert first and f"model> {first}\n" in out  # streamed to the terminal, all of it
    assert f"model> {spy.reply(tokenizer, 1)}\n" in out


def test_bfloat16_weights_chat_in_bfloat16(chat_model, monkeypatch, capsys):
    dtypes = []
    generate = ScratchGPTForCausalLM.generate
    monkeypatch.setattr(ScratchGPTForCausalLM, "generate",
                        lambda model, *a, **k: dtypes.append(model.lm_head.weight.dtype) or generate(model, *a, **k))
    out = chat(monkeypatch, capsys, [str(chat_model), *GREEDY, "--dtype", "bfloat16"], ["Name a colour.", "/exit"])
    assert dtypes == [torch.bfloat16] and "model> " in out


def test_reset_clears_the_history_and_exit_ends_the_chat(chat_model, tokenizer, monkeypatch, capsys):
    spy = GenerateSpy(monkeypatch)
    out = chat(monkeypatch, capsys, [str(chat_model), *GREEDY],
               ["Name a colour.", "/reset", "Name a fruit.", "/exit", "never read"])
    assert spy.prompts == [template_ids(tokenizer, [user("Name a colour.")]),
                           template_ids(tokenizer, [user("Name a fruit.")])]
    assert "(conversation cleared)" in out


def test_a_system_message_opens_every_prompt(chat_model, tokenizer, monkeypatch, capsys):
    spy = GenerateSpy(monkeypatch)
    chat(monkeypatch, capsys, [str(chat_model), *GREEDY, "--system", "You are terse."], ["Hi", "/reset", "Hi"])
    expected = template_ids(tokenizer, [{"role": "system", "content": "You are terse."}, user("Hi")])
    assert spy.prompts == [expected, expected]
    assert tokenizer.decode(expected).startswith("You are terse.")


def test_history_longer_than_the_context_is_cut_from_the_oldest_turn(chat_model, tokenizer, monkeypatch, capsys):
    spy = GenerateSpy(monkeypatch)
    messages = [f"Message number {n}: tell me about the weather in a town near the sea." for n in range(6)]
    out = chat(monkeypatch, capsys, [str(chat_model), *GREEDY], messages)
    assert len(spy.calls) == len(messages)  # every message answered: the chat went on
    assert "(the conversation outgrew the 128-token context: dropped its oldest 2 turns)" in out
    conversation, cuts = [], 0
    for i, (message, prompt) in enumerate(zip(messages, spy.prompts)):
        conversation.append(user(message))
        assert len(prompt) + 8 <= CONTEXT
        # The prompt is the conversation from some user turn on, the longest such that fits.
        starts = [s for s in range(0, len(conversation), 2)
                  if len(template_ids(tokenizer, conversation[s:])) + 8 <= CONTEXT]
        assert prompt == template_ids(tokenizer, conversation[starts[0]:]), f"turn {i}"
        cuts += starts[0] > 0
        conversation.append(assistant(spy.reply(tokenizer, i)))
    assert cuts >= 2  # the cut happened, and more than once
    assert "Message number 0" not in tokenizer.decode(spy.prompts[-1])
    assert "Message number 4" in tokenizer.decode(spy.prompts[-1])  # the previous turn stays


def test_a_message_longer_than_the_context_loses_its_start_and_the_chat_goes_on(chat_model, tokenizer, monkeypatch,
                                                                                  capsys):
    spy = GenerateSpy(monkeypatch)
    long = " ".join(f"word{n}" for n in range(200))
    out = chat(monkeypatch, capsys, [str(chat_model), *GREEDY], [long, "Short one."])
    assert len(spy.calls) == 2
    whole, first = template_ids(tokenizer, [user(long)]), spy.prompts[0]
    header = len(os.path.commonprefix([template_ids(tokenizer, [user(text)]) for text in ("x", "y")]))
    assert CONTEXT - 8 - 2 <= len(first) <= CONTEXT - 8  # all the room left after the reply's (re-encoding: 1-2)
    assert first[:header] == whole[:header]  # the template's instructions and header, whole
    assert first[-20:] == whole[-20:]  # the message's end, with the generation prompt
    assert "its first" in out and "tokens are left out" in out
    assert spy.prompts[1] == template_ids(tokenizer, [user("Short one.")])  # the long exchange is dropped


def test_a_model_without_chat_template_gets_plain_completion_and_says_so(tmp_path, gpt2, monkeypatch, capsys):
    folder = save_chat_model(tmp_path / "pretrained", gpt2, chat_template=False)
    spy = GenerateSpy(monkeypatch)
    out = chat(monkeypatch, capsys, [str(folder), *GREEDY], ["Every effort moves you", "The for statement"])
    assert "no chat template" in out and "plain completion" in out
    assert spy.prompts == [gpt2("Every effort moves you").input_ids, gpt2("The for statement").input_ids]


def test_sampling_flags_reach_generate_and_a_seed_repeats_the_reply(chat_model, tokenizer, monkeypatch, capsys):
    spy = GenerateSpy(monkeypatch)
    flags = [str(chat_model), "--temperature", "1.5", "--top_k", "0", "--top_p", "0.9", "--max_new_tokens", "5"]
    replies = [chat(monkeypatch, capsys, [*flags, "--seed", str(seed)], ["Hi"]) for seed in (3, 3, 4, 5, 6)]
    assert replies[0] == replies[1]
    assert len(set(replies)) > 2
    assert all(len(generated) == 5 or generated[-1] == 50256 for _, generated in spy.calls)
    sampling = {key: spy.kwargs[0][key] for key in ("do_sample", "temperature", "top_k", "top_p")}
    assert sampling == {"do_sample": True, "temperature": 1.5, "top_k": 0, "top_p": 0.9}


# ---------------------------------------------------------------------------------------------------------------
# Refusals: one line, before any work


def refused(argv: list[str], capsys, monkeypatch) -> str:
    """The one line with which `scratchgpt-chat argv` stops, having loaded no model."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("hf_scratchgpt.chat.load_model", load_model)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    message = capsys.readouterr().err.strip().splitlines()[-1] if code == 2 else code  # 2: a usage error
    assert isinstance(message, str) and "\n" not in message
    return message


def test_a_missing_folder_is_named(tmp_path, capsys, monkeypatch):
    assert refused([str(tmp_path / "nope")], capsys, monkeypatch) == f"scratchgpt-chat: error: no model folder " \
                                                                       f"{tmp_path / 'nope'}"


def test_a_folder_without_a_model_is_named(tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.txt").write_text("not a model")
    assert refused([str(tmp_path)], capsys, monkeypatch) == f"scratchgpt-chat: error: {tmp_path} holds no model " \
                                                             "(no config.json)"


def test_a_port_in_use_is_named_before_the_model_loads(chat_model, capsys, monkeypatch):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = refused([str(chat_model), "--web", "--port", str(port)], capsys, monkeypatch)
    assert message == f"scratchgpt-chat: error: port {port} on 127.0.0.1 is in use: choose another with --port"


@pytest.mark.parametrize("flags, message", [
    (["--port", "7860"], "--port and --share go with --web"),
    (["--share"], "--port and --share go with --web"),
    (["--web", "--system", "Be brief."], "--system goes with the terminal chat, not --web"),
    (["--web", "--port", "70000"], "--port must be in 1-65535, got 70000"),
    (["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
])
def test_flags_that_do_not_go_together_are_usage_errors(chat_model, capsys, monkeypatch, flags, message):
    assert refused([str(chat_model), *flags], capsys, monkeypatch) == f"scratchgpt-chat: error: {message}"


def test_a_classifier_has_no_terminal_chat(tmp_path, gpt2, capsys, monkeypatch):
    folder = save_chat_model(tmp_path / "classifier", gpt2, classifier=True)
    assert refused([str(folder)], capsys, monkeypatch) == (
        f"scratchgpt-chat: error: {folder} holds a classifier, not a language model: its page is "
        f"`scratchgpt-chat {folder} --web`")


def test_an_unloadable_folder_is_one_line(chat_model, tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder)])
    assert str(exit_info.value.code).startswith(f"scratchgpt-chat: error: cannot load {folder}: ")
    assert "\n" not in str(exit_info.value.code)


# ---------------------------------------------------------------------------------------------------------------
# The installed command


def test_pyproject_installs_the_command():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["scratchgpt-chat"] == "hf_scratchgpt.chat:main"


@pytest.mark.slow
def test_the_command_runs_as_a_module_through_its_stdin(chat_model):
    result = subprocess.run([sys.executable, "-m", "hf_scratchgpt.chat", str(chat_model), *GREEDY],
                            input="Name a colour.\nAnd another?\n/exit\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("model> ") == 2
    assert result.stdout.startswith(f"Chatting with {chat_model} (128-token context).")
