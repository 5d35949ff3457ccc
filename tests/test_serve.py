"""Tests of serving (chapter 7): `transformers serve` and `transformers chat` with a small instruction-tuned
ScratchGPT, exported as GPT-2 with its chat template (`scratchgpt-export --to gpt2`), through the `openai` client.

`transformers serve` 5.24 builds the class named in `config.architectures` from the transformers namespace, so it
serves the export, not the ScratchGPT folder (tests/test_export.py checks the export itself).
"""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from hf_scratchgpt import ScratchGPTForCausalLM
from hf_scratchgpt.export import export_to_gpt2
from test_chat import assistant, save_chat_model, template_ids, user  # tests/ is on sys.path
from test_export import served_model


MAX_TOKENS = 8


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, gpt2):
    return save_chat_model(tmp_path_factory.mktemp("instruct"), gpt2)


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    """The export of `chat_model`, served: (base URL, the export's path, the name requests give as `model`)."""
    exported = export_to_gpt2(chat_model, tmp_path_factory.mktemp("exports") / "gpt2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NO_PROXY", "127.0.0.1")  # the openai client's httpx reads proxies from the environment
        with served_model(exported) as base_url:
            yield base_url, exported


def greedy_reply(chat_model, messages: list[dict]) -> tuple[list[int], str]:
    """The prompt ids of `messages` through the chat template, and the ScratchGPT's own greedy reply to them."""
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    ids = template_ids(tokenizer, messages)
    model = ScratchGPTForCausalLM.from_pretrained(chat_model).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
    return ids, tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def client(base_url: str):
    from openai import OpenAI  # in the test extra

    return OpenAI(base_url=f"{base_url}/v1", api_key="-", max_retries=0)


@pytest.mark.slow
def test_openai_client_gets_a_chat_completion_with_the_models_chat_template(server, chat_model):
    base_url, exported = server
    messages = [user("Name a colour.")]
    ids, expected = greedy_reply(chat_model, messages)
    reply = client(base_url).chat.completions.create(model=str(exported), messages=messages,
                                                     max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected  # the ScratchGPT's own words
    assert reply.usage.prompt_tokens == len(ids)  # the Alpaca prompt of chapter 7, not the bare message
    assert reply.usage.completion_tokens <= MAX_TOKENS


@pytest.mark.slow
def test_openai_client_streams_a_chat_completion_with_the_history(server, chat_model):
    base_url, exported = server
    messages = [user("Name a colour."), assistant("Blue."), user("And another one?")]
    _, expected = greedy_reply(chat_model, messages)
    stream = client(base_url).chat.completions.create(model=str(exported), messages=messages, max_tokens=MAX_TOKENS,
                                                      temperature=0, stream=True)
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) > 1  # token by token
    assert "".join(pieces) == expected  # the reply to the whole conversation, through the template


@pytest.mark.slow
def test_transformers_chat_talks_to_the_server(server, chat_model, tmp_path):
    """`transformers chat MODEL URL` through its stdin: one message, no to continuing, then !exit."""
    base_url, exported = server
    _, expected = greedy_reply(chat_model, [user("Name a colour.")])
    # huggingface_hub's offline mode refuses every address, 127.0.0.1 included: `transformers chat` runs without it.
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_HOME": str(tmp_path),
                                                                          "NO_PROXY": "127.0.0.1", "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "transformers.cli.transformers", "chat", str(exported), base_url,
         f"max_new_tokens={MAX_TOKENS}", "do_sample=False", "--save-folder", str(tmp_path)],
        input="Name a colour.\nn\n!exit\n", capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert " ".join(expected.split()) in " ".join(result.stdout.split()), result.stdout[-2000:]  # the model's words
    assert f"{MAX_TOKENS} tokens in" in result.stdout
