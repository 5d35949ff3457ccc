"""Chapter 7, the LLM judge: the book's prompt, score parsing, a real HTTP endpoint on 127.0.0.1, a local model."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM
from hf_scratchgpt.judge import (
    EndpointJudge,
    JudgeUnavailable,
    LocalJudge,
    judge_prompt,
    judge_responses,
    parse_score,
)


WITH_INPUT = {
    "instruction": "Rewrite the sentence using a simile.",
    "input": "The car is very fast.",
    "output": "The car is as fast as lightning.",
    "model_response": "The car is as fast as a cheetah.",
}
WITHOUT_INPUT = {
    "instruction": "What type of cloud is typically associated with thunderstorms?",
    "input": "",
    "output": "The type of cloud typically associated with thunderstorms is cumulonimbus.",
    "model_response": "The type of cloud associated with thunderstorms is a cumulus cloud.",
}


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


def test_judge_prompt_is_the_books_with_input():
    assert judge_prompt(WITH_INPUT, "The car is as fast as a cheetah.") == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\n"
        "The car is very fast.` and correct output `The car is as fast as lightning.`, score the model response "
        "`The car is as fast as a cheetah.` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )


def test_judge_prompt_is_the_books_without_input():
    assert judge_prompt(WITHOUT_INPUT, "A cumulus cloud.") == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nWhat type of cloud is typically associated with "
        "thunderstorms?` and correct output `The type of cloud typically associated with thunderstorms is "
        "cumulonimbus.`, score the model response `A cumulus cloud.` on a scale from 0 to 100, where 100 is the "
        "best score. Respond with the integer number only."
    )


@pytest.mark.parametrize(
    "reply,score",
    [
        ("85", 85),
        (" 85\n", 85),
        ("Score: 70.", 70),
        ("85/100", 85),
        ("0", 0),
        ("100", 100),
        ("I would rate it 90%, as it is close.", 90),
        ("I cannot score this", None),
        ("", None),
        ("101", None),
        ("-5", None),
        ("85.5", None),
        ("85.0", 85),
        ("gpt4 says 60", 60),
        ("From 0 to 100: 80", 0),  # the first number counts
    ],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


class FakeOpenAI:
    """An OpenAI-like server on 127.0.0.1: answers each POST /v1/chat/completions with the next of `replies`.

    A reply is a string (the message content), an int (an HTTP error status), bytes (a raw body), or a float
    (seconds to wait before answering "50"). Every request is kept in `requests`.
    """

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                reply = fake.replies.pop(0) if self.path == "/v1/chat/completions" else 404
                if isinstance(reply, float):
                    time.sleep(reply)
                    reply = "50"
                status = 200
                if isinstance(reply, int):  # an error as OpenAI's API writes it
                    status, reply = reply, {"error": {"message": f"error {reply} of the fake", "type": "server_error"}}
                    reply = json.dumps(reply).encode()
                if isinstance(reply, str):
                    message = {"role": "assistant", "content": reply}
                    reply = json.dumps({"object": "chat.completion", "choices": [{"index": 0, "message": message}]})
                    reply = reply.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_openai():
    servers = []

    def start(replies):
        servers.append(FakeOpenAI(replies))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def closed_port() -> int:
    """A port that was free a moment ago and has no listener now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_endpoint_judge_scores_entries_through_http(fake_openai):
    server = fake_openai(["85", "Score: 70.", "I cannot score this"])
    judge = EndpointJudge(server.url + "/", "llama3", timeout=5)
    entries = [WITH_INPUT, WITHOUT_INPUT, {**WITH_INPUT, "model_response": "Fast car."}]
    result = judge_responses(entries, judge, progress=False)
    assert result == {"judge_scores": [85, 70, None], "judge_mean_score": 77.5, "judge_unparsed": 1, "judge_failed": 0}
    assert [request["path"] for request in server.requests] == ["/v1/chat/completions"] * 3
    for entry, request in zip(entries, server.requests):
        body = request["body"]
        assert body["model"] == "llama3"
        assert body["messages"] == [{"role": "user", "content": judge_prompt(entry, entry["model_response"])}]
        assert body["temperature"] == 0 and body["seed"] == 123
        assert "max_tokens" not in body and "Authorization" not in request["headers"]


def test_endpoint_judge_sends_the_api_key_and_max_tokens(fake_openai):
    server = fake_openai(["42"])
    assert EndpointJudge(server.url, "gpt", api_key="sk-test", max_tokens=8)("prompt") == "42"
    assert server.requests[0]["headers"]["Authorization"] == "Bearer sk-test"
    assert server.requests[0]["body"]["max_tokens"] == 8


def test_unreachable_endpoint_raises_at_once_with_the_url():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    start = time.perf_counter()
    with pytest.raises(JudgeUnavailable) as error:
        judge_responses([WITH_INPUT, WITHOUT_INPUT], EndpointJudge(url, "llama3", timeout=30), progress=False)
    assert time.perf_counter() - start < 5
    assert f"{url}/chat/completions" in one_line(error)


def test_http_error_raises_with_status_and_url(fake_openai):
    server = fake_openai([500])
    with pytest.raises(JudgeUnavailable) as error:
        judge_responses([WITH_INPUT], EndpointJudge(server.url, "llama3"), progress=False)
    message = one_line(error)
    assert message == f"{server.url}/chat/completions: HTTP 500 Internal Server Error: error 500 of the fake"


def test_malformed_reply_raises(fake_openai):
    server = fake_openai([b"this is not JSON\nat all", b'{"choices": []}', b'{"choices": [{"message": {}}]}'])
    judge = EndpointJudge(server.url, "llama3")
    for _ in range(3):
        with pytest.raises(JudgeUnavailable, match="malformed reply") as error:
            judge("prompt")
        assert server.url in one_line(error)


def test_slow_endpoint_times_out(fake_openai):
    server = fake_openai([2.0])
    start = time.perf_counter()
    with pytest.raises(JudgeUnavailable) as error:
        EndpointJudge(server.url, "llama3", timeout=0.3)("prompt")
    assert time.perf_counter() - start < 1.5
    assert "timed out" in one_line(error) or "no answer within" in one_line(error)


def test_later_failures_score_none_and_stop_after_a_run_of_them(fake_openai):
    server = fake_openai(["85", 500, "60", 500, 500, 500, "99"])
    result = judge_responses([WITH_INPUT] * 8, EndpointJudge(server.url, "llama3"), progress=False, max_failures=3)
    assert result["judge_scores"] == [85, None, 60, None, None, None, None, None]
    assert result["judge_mean_score"] == 72.5
    assert result["judge_unparsed"] == 0 and result["judge_failed"] == 6
    assert len(server.requests) == 6  # nothing asked after three failures in a row


def test_no_parsed_score_gives_no_mean():
    result = judge_responses([WITH_INPUT, WITHOUT_INPUT], lambda prompt: "no idea", progress=False)
    assert result == {"judge_scores": [None, None], "judge_mean_score": None, "judge_unparsed": 2, "judge_failed": 0}


@pytest.fixture(scope="module")
def tiny_judge_dir(gpt2, tmp_path_factory):
    """A tiny random ScratchGPT with GPT-2's tokenizer, saved; its context (64) is shorter than the prompt."""
    config = ScratchGPTConfig.from_preset("tiny", vocab_size=50257, bos_token_id=50256, eos_token_id=50256)
    folder = tmp_path_factory.mktemp("tiny_judge")
    ScratchGPTForCausalLM(config).save_pretrained(folder)
    gpt2.save_pretrained(folder)
    return folder


def test_local_judge_answers_and_is_counted(tiny_judge_dir):
    judge = LocalJudge(str(tiny_judge_dir), max_new_tokens=5)
    reply = judge(judge_prompt(WITH_INPUT, WITH_INPUT["model_response"]))
    assert isinstance(reply, str)
    assert judge(judge_prompt(WITH_INPUT, WITH_INPUT["model_response"])) == reply  # greedy
    result = judge_responses([WITH_INPUT, WITHOUT_INPUT], judge, progress=False)
    assert len(result["judge_scores"]) == 2 and result["judge_failed"] == 0
    parsed = [score for score in result["judge_scores"] if score is not None]
    assert result["judge_unparsed"] == 2 - len(parsed)
    assert result["judge_mean_score"] == (sum(parsed) / len(parsed) if parsed else None)


def test_local_judge_uses_the_chat_template_and_keeps_the_prompts_end(tiny_judge_dir, gpt2, tmp_path, monkeypatch):
    folder = tmp_path / "chat"
    ScratchGPTForCausalLM.from_pretrained(tiny_judge_dir).save_pretrained(folder)
    gpt2.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Judge:"
    try:
        gpt2.save_pretrained(folder)
    finally:
        gpt2.chat_template = None
    judge = LocalJudge(str(folder), max_new_tokens=4)
    seen = {}

    def generate(input_ids, **kwargs):
        import torch

        seen["input_ids"], seen["kwargs"] = input_ids, kwargs
        answer = torch.tensor([judge.tokenizer(" 42.").input_ids], device=input_ids.device)
        return torch.cat([input_ids, answer], dim=1)

    monkeypatch.setattr(judge.model, "generate", generate)
    assert judge(judge_prompt(WITH_INPUT, "whatever")) == "42."
    assert seen["input_ids"].shape[1] == 64 - 4  # the context less the new tokens
    assert judge.tokenizer.decode(seen["input_ids"][0]).endswith("Respond with the integer number only.\nJudge:")
    assert seen["kwargs"]["do_sample"] is False and seen["kwargs"]["max_new_tokens"] == 4


def test_a_chat_entry_is_judged_on_its_conversation_and_last_answer():
    entry = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}
    prompt = judge_prompt(entry, "Red.")
    assert prompt.startswith("Given the input `Below is an instruction that describes a task.")
    assert "### Instruction:\nName a colour.` and correct output `Blue.`, score the model response `Red.`" in prompt
