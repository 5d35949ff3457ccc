"""Tests of hf_scratchgpt/export.py: a saved ScratchGPT exported as GPT-2, refusals, and `transformers serve` on it.

`served_model(folder)` starts `transformers serve` on 127.0.0.1 for an exported folder and gives its base URL; a
test that needs an OpenAI-compatible server (an LLM judge) can reuse it.
"""

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, GenerationConfig, GPT2LMHeadModel

from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM, ScratchGPTForSequenceClassification
from hf_scratchgpt.export import export_to_gpt2, main
from ports import free_port


CHAT_TEMPLATE = (
    "{% for message in messages %}### {{ message['role'] }}:\n{{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)
PROMPT = "Every effort moves you"


def tiny_scratchgpt(seed: int = 0, **overrides) -> ScratchGPTForCausalLM:
    """A tiny ScratchGPT over GPT-2's vocabulary, with random biases and LayerNorms so that every weight counts."""
    torch.manual_seed(seed)
    config = ScratchGPTConfig.from_preset("tiny", vocab_size=50257, bos_token_id=50256, eos_token_id=50256, **overrides)
    model = ScratchGPTForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0, 0.5)
    return model


def save_source(folder: Path, model, tokenizer) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory, gpt2) -> Path:
    """A saved tiny ScratchGPT with GPT-2's tokenizer, a chat template and a generation config of its own."""
    folder = tmp_path_factory.mktemp("scratchgpt")
    gpt2.save_pretrained(folder)  # a copy: the session's tokenizer is shared, and keeps no template
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = tiny_scratchgpt()
    model.generation_config.max_new_tokens = 40  # not derived from the model's config: shows the file is carried over
    return save_source(folder, model, tokenizer)


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory) -> Path:
    return export_to_gpt2(source, tmp_path_factory.mktemp("exports") / "gpt2")


def check_ids(n: int = 16) -> torch.Tensor:
    return torch.randint(0, 50257, (2, n), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# The exported folder


def test_export_writes_gpt2_safetensors_tokenizer_chat_template_generation_config_and_readme(source, exported):
    files = {p.name for p in exported.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
            "README.md"} <= files
    assert not any(name.endswith((".py", ".bin")) for name in files)  # no remote code, no pickles
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert (exported / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    generation = GenerationConfig.from_pretrained(exported)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (50256, 50256, 50256)
    assert generation.max_new_tokens == 40
    assert str(exported.resolve()) in (exported / "README.md").read_text()


def test_exported_tokenizer_gives_the_sources_ids(source, exported, gpt2):
    tokenizer = AutoTokenizer.from_pretrained(exported)
    text = "Every effort moves you <|endoftext|> naïve 😀"
    assert tokenizer(text).input_ids == gpt2(text).input_ids
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True).endswith(
        "### assistant:\n"
    )


def test_exported_model_has_the_scratchgpts_logits_and_greedy_tokens(source, exported):
    ours = ScratchGPTForCausalLM.from_pretrained(source).eval()
    theirs = GPT2LMHeadModel.from_pretrained(exported).eval()  # no trust_remote_code: transformers' own GPT-2
    ids = check_ids()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)
    prompt = dict(input_ids=ids[:1, :5], attention_mask=torch.ones(1, 5, dtype=torch.long))
    greedy = theirs.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(greedy, ours.generate(**prompt, max_new_tokens=12, do_sample=False))
    assert greedy.shape[1] > 5


def test_a_wrong_weight_mapping_is_caught_by_the_exports_own_check(source, tmp_path, monkeypatch):
    import hf_scratchgpt.conversion as conversion

    right = conversion.state_dict_to_gpt2

    def swapped_layer_norm(sd, config):  # LayerNorm 1 and 2 of block 0 exchanged: plausible shapes, wrong function
        gpt2_sd = right(sd, config)
        for name in ("weight", "bias"):
            ln_1, ln_2 = f"transformer.h.0.ln_1.{name}", f"transformer.h.0.ln_2.{name}"
            gpt2_sd[ln_1], gpt2_sd[ln_2] = gpt2_sd[ln_2], gpt2_sd[ln_1]
        return gpt2_sd

    monkeypatch.setattr(conversion, "state_dict_to_gpt2", swapped_layer_norm)
    with pytest.raises(ValueError, match="does not compute the ScratchGPT's logits"):
        export_to_gpt2(source, tmp_path / "out")


@pytest.mark.slow
def test_exported_folder_loads_in_a_python_without_hf_scratchgpt(source, exported, tmp_path):
    """A fresh Python in which `import hf_scratchgpt` fails loads the folder as plain GPT-2, with the same logits."""
    script = f"""
import sys
sys.modules["hf_scratchgpt"] = None  # any import of the package now fails
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(exported)!r}).eval()
assert type(model).__name__ == "GPT2LMHeadModel", type(model)
ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    torch.save(model(ids).logits, {str(tmp_path / "logits.pt")!r})
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    ours = ScratchGPTForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ours(check_ids()).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied, qkv_bias", [(False, False), (False, True), (True, True)])
def test_untied_embeddings_and_qkv_bias_export_exactly(tmp_path, gpt2, tied, qkv_bias):
    ours = tiny_scratchgpt(seed=3, tie_word_embeddings=tied, qkv_bias=qkv_bias)
    out = export_to_gpt2(save_source(tmp_path / "src", ours, gpt2), tmp_path / "out")
    theirs = GPT2LMHeadModel.from_pretrained(out).eval()
    assert theirs.config.tie_word_embeddings == tied
    # Untied: two matrices, each its own (transformers 5.24 keeps lm_head.weight apart from wte).
    assert (theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr()) == tied
    torch.testing.assert_close(theirs.lm_head.weight, ours.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(theirs.transformer.wte.weight, ours.model.tok_emb.weight, rtol=0, atol=0)
    bias = theirs.transformer.h[0].attn.c_attn.bias
    if qkv_bias:
        torch.testing.assert_close(bias, ours.model.trf_blocks[0].att.qkv.bias, rtol=0, atol=0)
    else:
        assert not bias.any()  # the book's model has none: zero is the same function
    ids = check_ids()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


def test_bf16_model_exports_as_bf16(tmp_path, gpt2):
    ours = tiny_scratchgpt(seed=4).to(torch.bfloat16)
    out = export_to_gpt2(save_source(tmp_path / "src", ours, gpt2), tmp_path / "out")
    theirs = GPT2LMHeadModel.from_pretrained(out)
    assert theirs.dtype == torch.bfloat16
    torch.testing.assert_close(theirs.transformer.h[1].mlp.c_fc.weight, ours.model.trf_blocks[1].ff.fc1.weight.t(),
                               rtol=0, atol=0)


def test_overwrite_writes_into_a_non_empty_folder(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    export_to_gpt2(source, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert (out / "notes.txt").read_text() == "kept"


def test_the_command_prints_where_it_saved_and_how_to_serve_it(source, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(source), str(out), "--to", "gpt2"]) is None
    printed = capsys.readouterr().out
    assert f"to {out}" in printed
    assert f"transformers serve {out.resolve()} --host 127.0.0.1 --port 8000" in printed
    assert f'"model": "{out.resolve()}"' in printed


# ---------------------------------------------------------------------------------------------------------------
# Refusals: one line on stderr, exit status 2, nothing written


def refused(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # what the test printed while it made its folders
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("scratchgpt-export: error: ") and err.count("\n") == 1, err
    return err


def test_refuses_a_folder_of_another_model_type(tmp_path, capsys):
    BertConfig(num_hidden_layers=1).save_pretrained(tmp_path / "bert")
    assert "is a bert model, not ScratchGPT" in refused(capsys, [str(tmp_path / "bert"), str(tmp_path / "out"),
                                                                  "--to", "gpt2"])
    assert not (tmp_path / "out").exists()


def test_refuses_a_gpt2_folder(exported, tmp_path, capsys):
    assert "already a GPT-2 model" in refused(capsys, [str(exported), str(tmp_path / "out"), "--to", "gpt2"])


def test_refuses_a_classifier(tmp_path, gpt2, capsys):
    torch.manual_seed(0)
    config = ScratchGPTConfig.from_preset("tiny", vocab_size=50257, num_labels=2)
    folder = save_source(tmp_path / "classifier", ScratchGPTForSequenceClassification(config), gpt2)
    err = refused(capsys, [str(folder), str(tmp_path / "out"), "--to", "gpt2"])
    assert "holds ScratchGPTForSequenceClassification, not ScratchGPTForCausalLM" in err
    assert not (tmp_path / "out").exists()


def test_refuses_an_existing_non_empty_out(source, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("mine")
    assert "exists and is not empty: pass --overwrite" in refused(capsys, [str(source), str(tmp_path / "out"),
                                                                          "--to", "gpt2"])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


def test_an_existing_empty_out_is_fine(source, tmp_path):
    (tmp_path / "out").mkdir()
    assert (export_to_gpt2(source, tmp_path / "out") / "model.safetensors").is_file()


def test_refuses_the_source_folder_as_out_even_with_overwrite(source, capsys):
    assert "is the source folder itself" in refused(capsys, [str(source), str(source), "--to", "gpt2", "--overwrite"])


def test_refuses_a_config_field_gpt2_is_not_known_to_express(source, tmp_path, capsys):
    folder = tmp_path / "src"
    folder.mkdir()
    for path in source.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_kv_heads": 2, "rope_theta": 10000.0}))
    err = refused(capsys, [str(folder), str(tmp_path / "out"), "--to", "gpt2"])
    assert "fields the GPT-2 export does not know: n_kv_heads, rope_theta" in err


def test_refuses_a_model_without_tokenizer_and_a_missing_folder(tmp_path, capsys):
    tiny_scratchgpt().save_pretrained(tmp_path / "bare")
    assert "has no tokenizer" in refused(capsys, [str(tmp_path / "bare"), str(tmp_path / "out"), "--to", "gpt2"])
    assert "no model folder" in refused(capsys, [str(tmp_path / "nope"), str(tmp_path / "out"), "--to", "gpt2"])


def test_to_takes_gpt2_only(source, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(source), str(tmp_path / "out"), "--to", "onnx"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'onnx'" in capsys.readouterr().err


@pytest.mark.slow
def test_python_m_refuses_with_exit_status_2_and_one_line(exported, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hf_scratchgpt.export", str(exported), str(tmp_path / "out"), "--to", "gpt2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"scratchgpt-export: error: {exported} is already a GPT-2 model "
                                          "(model_type gpt2): serve it as it is"]


# ---------------------------------------------------------------------------------------------------------------
# transformers serve, on 127.0.0.1 only


# No proxy, whatever the environment says: every request of these tests goes to 127.0.0.1.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def post_json(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with _LOCAL.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, {"error": err.read().decode(errors="replace")}


@contextlib.contextmanager
def served_model(folder: str | os.PathLike, timeout: float = 60.0) -> Iterator[str]:
    """Run `transformers serve FOLDER` on 127.0.0.1 at a free port, offline, until the block ends; yield its base URL.

    The server is pinned to `folder`: requests name it with `"model": str(folder)` (the same string) or not at all.
    It answers once the model is loaded; the server is terminated on leaving the block, whatever happened.
    """
    import transformers.utils.import_utils as import_utils

    if not import_utils.is_serve_available():
        pytest.fail('transformers serve needs its extra: pip install "transformers[serving]"')
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    home = Path(folder).parent / f"hf_home_{port}"  # no reads or writes in ~/.cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HOME": str(home),
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder),
               "--host", "127.0.0.1", "--port", str(port)]  # what the `transformers` console script runs
    log = Path(folder).parent / f"serve_{port}.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                pytest.fail(f"transformers serve exited with {server.returncode}: {log.read_text()[-2000:]}")
            try:
                with _LOCAL.open(f"{base_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not answer in {timeout:.0f} s: {log.read_text()[-2000:]}")
            time.sleep(0.25)
        yield base_url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.slow
def test_transformers_serve_answers_completions_and_chat_completions(source, exported):
    ours = ScratchGPTForCausalLM.from_pretrained(source).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    model = str(exported)
    with served_model(exported) as base_url:
        status, reply = post_json(f"{base_url}/v1/completions",
                                  {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert status == 200, reply
        text = reply["choices"][0]["text"]
        assert isinstance(text, str) and text
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        greedy = ours.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        assert text == tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)  # the model's own words

        messages = [{"role": "user", "content": "Name a colour."}]
        status, reply = post_json(f"{base_url}/v1/chat/completions",
                                  {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0})
        assert status == 200, reply
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(reply["choices"][0]["message"]["content"], str)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert reply["usage"]["prompt_tokens"] == len(prompt["input_ids"])  # formatted by the carried template
