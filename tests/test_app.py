"""Tests of hf_scratchgpt/app.py: the prompt of a conversation, the streamed reply, the web page in a real browser
(headless Chromium driven by Playwright), and the same file as a Space's app.py.

The browser is the distribution's (`apt-get install chromium`; Playwright cannot download its own builds here). Where
it or Playwright is missing, the browser tests skip and say so, except on CI (CI=true), where they fail. Screenshots
are kept in test-results/ at the repository's root (ignored by git).
"""

import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

import hf_scratchgpt.app as app
from hf_scratchgpt import ScratchGPTForCausalLM, ScratchGPTForSequenceClassification
from hf_scratchgpt.app import build_page, fit_prompt, label_scores, launch_page, stream_reply, write_space_app
from ports import free_port  # tests/ is on sys.path
from test_chat import LABELS, GenerateSpy, assistant, save_chat_model, template_ids, user


RESULTS = Path(__file__).resolve().parents[1] / "test-results"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"  # CHROMIUM=path: another build


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, gpt2) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("instruct"), gpt2)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, gpt2) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("classifier"), gpt2, classifier=True)


@pytest.fixture(scope="module")
def tokenizer(chat_model):
    return AutoTokenizer.from_pretrained(chat_model)


# ---------------------------------------------------------------------------------------------------------------
# The prompt and the reply


def test_fit_prompt_keeps_the_system_message_when_it_drops_the_oldest_exchange(tokenizer):
    system = {"role": "system", "content": "Answer briefly."}
    long = "a long question about the sea and the weather " * 3
    messages = [system, user(long), assistant("an answer " * 5), user(long), assistant("another answer"), user("Hi")]
    context = len(template_ids(tokenizer, [system, *messages[3:]])) + 10
    prompt = fit_prompt(tokenizer, messages, context, max_new_tokens=10)
    assert prompt.messages == [system, *messages[3:]] and prompt.dropped_turns == 2
    assert prompt.ids == template_ids(tokenizer, prompt.messages)
    assert (prompt.cut_tokens, prompt.max_new_tokens) == (0, 10)


def test_fit_prompt_leaves_at_least_half_the_context_to_the_prompt(tokenizer):
    prompt = fit_prompt(tokenizer, [user("Hi")], context=128, max_new_tokens=500)
    assert prompt.ids == template_ids(tokenizer, [user("Hi")])
    assert prompt.max_new_tokens == 128 - len(prompt.ids)  # the reply fills the rest of the context
    long = fit_prompt(tokenizer, [user("word " * 200)], context=128, max_new_tokens=500)
    assert len(long.ids) <= 64 and long.max_new_tokens == 128 - len(long.ids) and long.cut_tokens > 0


def test_a_message_too_long_loses_its_own_first_tokens_and_keeps_the_template(tokenizer):
    system = {"role": "system", "content": "Answer briefly."}
    words = " ".join(f"w{i}" for i in range(150))
    prompt = fit_prompt(tokenizer, [system, user(words)], context=128, max_new_tokens=20)
    content = tokenizer(words, add_special_tokens=False).input_ids
    kept = prompt.messages[-1]["content"]
    assert prompt.messages[0] == system and words.endswith(kept) and kept.endswith("w149")
    assert prompt.ids == template_ids(tokenizer, prompt.messages)  # the whole template, around the message's end
    assert 128 - 20 - 2 <= len(prompt.ids) <= 128 - 20  # as much of the message as fits (re-encoding: a token or two)
    assert prompt.cut_tokens == len(content) - len(tokenizer(kept, add_special_tokens=False).input_ids)


def test_a_system_message_too_long_cuts_the_prompts_start_and_keeps_the_users_message(tokenizer):
    system, question = {"role": "system", "content": "sys " * 200}, user("hello there")
    prompt = fit_prompt(tokenizer, [system, question], context=128, max_new_tokens=20)
    assert prompt.messages == [system, question] and prompt.ids == template_ids(tokenizer, prompt.messages)[-108:]


def test_without_a_chat_template_the_prompt_is_the_last_message_alone(gpt2):
    prompt = fit_prompt(gpt2, [user("Every effort"), assistant("moves you"), user("The for statement")], 128, 8)
    assert prompt.ids == gpt2("The for statement").input_ids and prompt.dropped_turns == 0


def test_stream_reply_streams_the_greedy_tokens_of_generate(chat_model, tokenizer):
    model = ScratchGPTForCausalLM.from_pretrained(chat_model).eval()
    ids = template_ids(tokenizer, [user("Name a colour.")])
    pieces = list(stream_reply(model, tokenizer, ids, max_new_tokens=12, do_sample=False))
    greedy = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    assert len(pieces) > 1  # pieces, as they came
    assert "".join(pieces) == tokenizer.decode(greedy, skip_special_tokens=True)


def test_an_error_in_generate_reaches_the_caller(chat_model, tokenizer):
    model = ScratchGPTForCausalLM.from_pretrained(chat_model).eval()
    with pytest.raises(ValueError, match="context"):  # the model refuses a sequence longer than its context
        list(stream_reply(model, tokenizer, list(range(100)), max_new_tokens=100, do_sample=False))


def test_label_scores_are_the_classifiers_probabilities(classifier):
    model = ScratchGPTForSequenceClassification.from_pretrained(classifier).eval()
    tokenizer = AutoTokenizer.from_pretrained(classifier)
    scores = label_scores(model, tokenizer, "You won a prize, call now")
    with torch.no_grad():
        expected = model(**tokenizer("You won a prize, call now", return_tensors="pt")).logits[0].softmax(-1)
    assert list(scores) == LABELS
    assert list(scores.values()) == pytest.approx(expected.tolist())


# ---------------------------------------------------------------------------------------------------------------
# app.py as a Space's


def test_app_py_needs_nothing_but_torch_transformers_and_gradio():
    tree = ast.parse(Path(app.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))  # no relative import
    assert imported - set(sys.stdlib_module_names) == {"torch", "transformers", "gradio"}


def test_write_space_app_makes_the_folder_a_space(chat_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(chat_model, folder)
    card = "---\nlibrary_name: transformers\ntags:\n- generated_from_trainer\n---\n\n# card\n"
    (folder / "README.md").write_text(card)
    assert write_space_app(folder) == folder / "app.py"
    assert (folder / "app.py").read_text() == Path(app.__file__).read_text()
    assert "gradio>=6.31,<6.32" in (folder / "requirements.txt").read_text().splitlines()
    readme = (folder / "README.md").read_text()
    header = yaml.safe_load(readme.split("---\n")[1])
    assert header == {"library_name": "transformers", "tags": ["generated_from_trainer"],  # the card's, kept
                      "sdk": "gradio", "sdk_version": importlib.metadata.version("gradio"), "app_file": "app.py"}
    assert readme.endswith("\n# card\n")
    write_space_app(folder)  # again: the header is not doubled
    assert (folder / "README.md").read_text() == readme


@pytest.mark.slow
def test_app_py_serves_the_model_of_its_own_folder_without_hf_scratchgpt(chat_model, tokenizer, tmp_path):
    """`python app.py` in a prepared folder, in a Python where `import hf_scratchgpt` fails, answers a chat
    request through Gradio's client with the model's own greedy reply."""
    from gradio_client import Client

    folder = tmp_path / "space"
    shutil.copytree(chat_model, folder)
    write_space_app(folder)
    port = free_port()
    script = "import runpy, sys; sys.modules['hf_scratchgpt'] = None; runpy.run_path('app.py', run_name='__main__')"
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "NO_PROXY": "127.0.0.1"}
    log = tmp_path / "app.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen([sys.executable, "-c", script], cwd=folder, env=env, stdout=log_file,
                                  stderr=subprocess.STDOUT)
    try:
        url = wait_for_page(f"http://127.0.0.1:{port}/", server, log)
        reply = Client(url, verbose=False).predict("Name a colour.", 0, 50, 1.0, 8, api_name="/chat")
    finally:
        server.terminate()
        server.wait(timeout=30)
    model = ScratchGPTForCausalLM.from_pretrained(chat_model).eval()
    ids = template_ids(tokenizer, [user("Name a colour.")])
    greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
    assert reply == tokenizer.decode(greedy, skip_special_tokens=True)


@pytest.mark.slow
def test_scratchgpt_chat_web_serves_the_page_on_the_port_given(chat_model, tmp_path):
    from gradio_client import Client

    port = free_port()
    log = tmp_path / "web.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "hf_scratchgpt.chat", str(chat_model), "--web", "--port",
                                   str(port)], env={**os.environ, "NO_PROXY": "127.0.0.1"}, stdout=log_file,
                                  stderr=subprocess.STDOUT)
    try:
        url = wait_for_page(f"http://127.0.0.1:{port}/", server, log)
        reply = Client(url, verbose=False).predict("Hi", 0, 50, 1.0, 4, api_name="/chat")
        taken = subprocess.run([sys.executable, "-m", "hf_scratchgpt.chat", str(chat_model), "--web", "--port",
                                str(port)], capture_output=True, text=True, timeout=300)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert isinstance(reply, str) and reply
    assert taken.returncode == 1
    assert taken.stderr.strip().splitlines() == [f"scratchgpt-chat: error: port {port} on 127.0.0.1 is in use: "
                                                 "choose another with --port"]


def wait_for_page(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"app.py exited with {server.returncode}: {log.read_text()[-2000:]}")
        try:
            with opener.open(url + "config", timeout=2) as response:
                if response.status == 200:
                    return url
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"app.py did not answer in {timeout:.0f} s: {log.read_text()[-2000:]}")


# ---------------------------------------------------------------------------------------------------------------
# The page in a real browser


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (the distribution's) under Playwright; skipped where missing, but not on CI."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "Playwright for Python is not installed (pip install -e '.[test]')"
    else:
        missing = None if os.access(CHROMIUM, os.X_OK) else f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


class SlowStreamer(app.TextIteratorStreamer):
    """A streamer that waits between tokens, so that the browser sees the reply grow."""

    def put(self, value):
        time.sleep(0.15)
        super().put(value)


def serve(page) -> str:
    _, url, _ = launch_page(page, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True)
    return url


@pytest.mark.slow
def test_the_chat_page_streams_the_reply_in_a_real_browser(browser, chat_model, tokenizer, monkeypatch):
    spy = GenerateSpy(monkeypatch)
    monkeypatch.setattr(app, "TextIteratorStreamer", SlowStreamer)
    page = build_page(chat_model)
    try:
        url = serve(page)
        tab = browser.new_page(viewport={"width": 1100, "height": 900})
        requests = []
        tab.on("request", lambda request: requests.append(request.url))
        tab.goto(url)
        max_new_tokens = tab.get_by_label("number input for Max new tokens")
        max_new_tokens.fill("10")
        max_new_tokens.press("Enter")
        tab.get_by_test_id("textbox").fill("Name a colour.")
        tab.get_by_test_id("textbox").press("Enter")
        seen, reply = [], tab.get_by_test_id("bot")
        deadline = time.monotonic() + 60
        while len(spy.calls) < 1 and time.monotonic() < deadline:  # the spy records once generate() has ended
            if reply.count():
                seen.append(reply.last.inner_text())
            time.sleep(0.05)
        expected = spy.reply(tokenizer, 0)
        tab.wait_for_function("text => [...document.querySelectorAll('[data-testid=bot]')].some("
                              "m => m.innerText.trim() === text)", arg=expected.strip(), timeout=30_000)
        RESULTS.mkdir(exist_ok=True)
        tab.screenshot(path=RESULTS / "chat_page.png", full_page=True)
    finally:
        page.close()
    assert spy.prompts == [template_ids(tokenizer, [user("Name a colour.")])]  # through the chat template
    assert len(spy.calls[0][1]) <= 10  # the page's Max new tokens reached generate()
    growing = [text for text in dict.fromkeys(seen) if text.strip()]
    assert len(growing) >= 3, growing  # streamed: the reply grew in the page
    assert all(expected.strip().startswith(text.strip()) for text in growing)
    assert tab.get_by_test_id("user").inner_text() == "Name a colour."
    assert all(request.startswith(url) for request in requests), [r for r in requests if not r.startswith(url)]
    assert (RESULTS / "chat_page.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_classifier_page_shows_each_labels_score_in_a_real_browser(browser, classifier):
    model = ScratchGPTForSequenceClassification.from_pretrained(classifier).eval()
    scores = label_scores(model, AutoTokenizer.from_pretrained(classifier), "You won a prize, call now")
    page = build_page(classifier)
    try:
        tab = browser.new_page(viewport={"width": 1100, "height": 700})
        tab.goto(serve(page))
        tab.get_by_label("Text").fill("You won a prize, call now")
        tab.get_by_role("button", name="Submit").click()
        output = tab.get_by_test_id("label")
        top = max(scores, key=scores.get)
        tab.wait_for_function("label => document.querySelector('[data-testid=label]')?.innerText.includes(label)",
                              arg=top, timeout=30_000)
        text = output.inner_text()
        RESULTS.mkdir(exist_ok=True)
        tab.screenshot(path=RESULTS / "classifier_page.png", full_page=True)
    finally:
        page.close()
    for label, score in scores.items():
        assert label in text and f"{round(100 * score)}%" in text, text


# ---------------------------------------------------------------------------------------------------------------
# The recipes' --space_app: what --push_to_hub uploads


class FakeHub:
    """Stands in for the Hub API of `Trainer`: records the files of each folder it is asked to upload."""

    def __init__(self):
        self.uploads: list[dict[str, str]] = []

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, folder_path, **kwargs):
        files = {path.name: path for path in Path(folder_path).iterdir() if path.is_file()}
        self.uploads.append({name: files[name].read_text() for name in ("app.py", "README.md") if name in files}
                            | {"files": sorted(files)})


@pytest.mark.slow
def test_a_recipe_with_space_app_pushes_the_page_and_the_spaces_settings(tmp_path, monkeypatch):
    from test_pretrain_recipe import pretrain, tiny_args  # tests/ is on sys.path

    import transformers.trainer
    from hf_scratchgpt.data import default_corpus

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(default_corpus()[:12])[:40_000])
    out = tmp_path / "run"
    pretrain.main(tiny_args(corpus, out, "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
                            "--space_app", "true", "--push_to_hub", "true", "--hub_model_id", "me/tiny"))
    assert hub.uploads  # pushed, the fake Hub says
    for upload in hub.uploads:
        assert {"app.py", "requirements.txt", "model.safetensors", "config.json", "tokenizer.json"} <= set(
            upload["files"])
        assert upload["app.py"] == Path(app.__file__).read_text()
        header = yaml.safe_load(upload["README.md"].split("---\n")[1])
        assert (header["sdk"], header["app_file"], header["library_name"]) == ("gradio", "app.py", "transformers")
        assert "## Try it" in upload["README.md"]
