"""Chapter 7, evaluating the answers with a larger LLM as judge: the book's scoring prompt of section 7.8.

A larger model reads each test entry, its reference output and our model's response, and answers a score from
0 to 100; the book asks Llama 3 through Ollama and reports the mean. Here the judge is any callable from a prompt
to the reply text: `EndpointJudge` asks an OpenAI-compatible server (Ollama at http://localhost:11434/v1, vLLM,
`transformers serve`) with the standard library only, `LocalJudge` runs a causal LM in this process.
`judge_responses` scores every entry and raises `JudgeUnavailable` at once when the first question gets no answer.
"""

import http.client
import json
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence

from tqdm.auto import tqdm

from .data.instruction import format_instruction, render_prompt, response_text


logger = logging.getLogger(__name__)

BOOK_SEED = 123  # the book's Ollama options: seed 123, temperature 0, "required for deterministic responses"

# The first number of a reply, not a piece of a word ("gpt4") nor of a decimal's fraction; a sign or a fraction is
# kept so that "-5" and "85.5" are read as what they are (out of range, not an integer) rather than as 5 and 85.
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?!\w)")


class JudgeUnavailable(Exception):
    """The judge gave no answer (server down, timeout, HTTP error, malformed reply); the message is one line."""

    def __init__(self, reason: str):
        super().__init__(" ".join(str(reason).split()))


def judge_prompt(entry: Mapping, response: str) -> str:
    """The book's prompt, word for word (ch07 `generate_model_scores`), for an entry and a model response.

    `format_input(entry)` of the book is `format_instruction(entry, with_response=False)`: the Alpaca prompt. A chat
    entry (`messages`) gives its conversation up to the last answer, and that answer as the correct output.
    """
    if "messages" in entry:
        given, correct = render_prompt(entry).removesuffix("\n\n### Response:\n"), response_text(entry)
    else:
        given, correct = format_instruction(entry, with_response=False), entry["output"]
    return (
        f"Given the input `{given}` "
        f"and correct output `{correct}`, "
        f"score the model response `{response}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


def parse_score(reply: str) -> int | None:
    """The score in a judge's reply: its first number, when that is an integer from 0 to 100; else None.

    "85", "Score: 70." and "85/100" give 85, 70 and 85; "I cannot score this", "-5", "101" and "85.5" give None.
    Only the first number counts: "From 0 to 100, 80" gives 0, as the book asks for the number only.
    """
    match = _NUMBER.search(reply)
    if match is None:
        return None
    value = float(match.group())
    return int(value) if value.is_integer() and 0 <= value <= 100 else None


class EndpointJudge:
    """A judge behind an OpenAI-compatible chat completions endpoint, asked greedily with the book's seed.

    `url` is the API base, `{url}/chat/completions` the address asked; `api_key`, when given, is sent as a
    bearer token. `max_tokens` (default: the server's) caps the reply. Every failure raises `JudgeUnavailable`.
    """

    def __init__(
        self, url: str, model: str, *, timeout: float = 60.0, api_key: str | None = None, max_tokens: int | None = None
    ):
        self.endpoint = f"{url.rstrip('/')}/chat/completions"
        self.model, self.timeout, self.api_key, self.max_tokens = model, timeout, api_key, max_tokens

    def __repr__(self) -> str:
        return f"EndpointJudge({self.endpoint!r}, model={self.model!r})"

    def __call__(self, prompt: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,  # greedy
            "seed": BOOK_SEED,
        }
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as error:  # before URLError, its parent
            detail = _error_detail(error.read(2000))
            raise JudgeUnavailable(f"{self.endpoint}: HTTP {error.code} {error.reason}{detail}") from None
        except urllib.error.URLError as error:
            raise JudgeUnavailable(f"{self.endpoint}: {error.reason}") from None
        except TimeoutError:
            raise JudgeUnavailable(f"{self.endpoint}: no answer within {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as error:
            raise JudgeUnavailable(f"{self.endpoint}: {type(error).__name__}: {error}") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, LookupError, TypeError):
            raise JudgeUnavailable(f"{self.endpoint}: malformed reply: {raw[:200].decode(errors='replace')}") from None
        if not isinstance(content, str):
            raise JudgeUnavailable(f"{self.endpoint}: malformed reply, message content is {content!r}")
        return content


def _error_detail(body: bytes) -> str:
    """The message of an error reply: OpenAI's `{"error": {"message"}}`, FastAPI's `{"detail"}`, or its start."""
    try:
        data = json.loads(body)
        detail = data.get("error", data.get("detail", body.decode()))
        detail = detail.get("message", detail) if isinstance(detail, dict) else detail
    except (ValueError, AttributeError):
        detail = body.decode(errors="replace")
    detail = " ".join(str(detail).split())
    return f": {detail[:200]}" if detail else ""


class LocalJudge:
    """A judge run in this process: a causal LM and its tokenizer, greedy, the chat template when it has one.

    A prompt longer than the model's context keeps its last tokens, as the book's `generate` does.
    """

    def __init__(self, model_name_or_path: str, *, max_new_tokens: int = 16):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype="auto")
        self.model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.max_new_tokens = max_new_tokens

    def __repr__(self) -> str:
        return f"LocalJudge({self.model.name_or_path!r})"

    def __call__(self, prompt: str) -> str:
        import torch

        if self.tokenizer.chat_template is not None:
            messages = [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        # A chat template writes its own special tokens; a plain prompt gets the tokenizer's usual ones.
        ids = self.tokenizer(text, add_special_tokens=self.tokenizer.chat_template is None).input_ids
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context is not None and len(ids) + self.max_new_tokens > context:
            ids = ids[-(context - self.max_new_tokens) :]
        input_ids = torch.tensor([ids], device=self.model.device)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        with torch.no_grad():
            out = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=pad if pad is not None else eos,
            )
        return self.tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


def judge_responses(
    entries: Sequence[Mapping], judge: Callable[[str], str], *, progress: bool = True, max_failures: int = 3
) -> dict:
    """The judge's score of every entry's `model_response`, their mean, and how many replies held no score.

    Returns `judge_scores` (an int or None per entry), `judge_mean_score` (over the parsed scores; None when there
    is none), `judge_unparsed` (replies without a score from 0 to 100) and `judge_failed` (questions that got no
    answer). A judge unavailable at the first question raises `JudgeUnavailable` at once; later, a question that
    fails scores None, and after `max_failures` failures in a row the remaining entries are left unscored.
    """
    scores: list[int | None] = []
    unparsed = failed = in_a_row = 0
    for index, entry in enumerate(tqdm(entries, desc="Judging", disable=not progress)):
        if in_a_row >= max_failures:
            scores.append(None)
            failed += 1
            continue
        try:
            reply = judge(judge_prompt(entry, entry["model_response"]))
        except JudgeUnavailable as error:
            if index == 0:
                raise
            logger.warning("judge failed on entry %d: %s", index, error)
            scores.append(None)
            failed, in_a_row = failed + 1, in_a_row + 1
            if in_a_row == max_failures:
                logger.warning("judge failed %d times in a row: the remaining entries are not scored", in_a_row)
            continue
        in_a_row = 0
        score = parse_score(reply)
        if score is None:
            unparsed += 1
            logger.info("no score in the judge's reply to entry %d: %r", index, reply[:100])
        scores.append(score)
    parsed = [score for score in scores if score is not None]
    return {
        "judge_scores": scores,
        "judge_mean_score": sum(parsed) / len(parsed) if parsed else None,
        "judge_unparsed": unparsed,
        "judge_failed": failed,
    }


__all__ = ["JudgeUnavailable", "judge_prompt", "parse_score", "EndpointJudge", "LocalJudge", "judge_responses"]
