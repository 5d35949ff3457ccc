"""Chapter 7, talking to the instruction-tuned model: a conversation's prompt, a streamed reply, and the web page.

    scratchgpt-chat runs/instruct-cpu --web [--port 7860] [--share]
    python app.py        # in a folder prepared by `write_space_app` (or a Hugging Face Space made from it)

This file imports only torch, transformers and gradio (the page only), so that it also runs as the `app.py` of a
saved model folder or a Hugging Face Space, beside the model it serves: like the modeling files that travel with a
ScratchGPT, it needs no hf_scratchgpt there, and the model loads with `trust_remote_code=True`.

- `sampling_kwargs`: `generate()`'s arguments for a temperature, top-k and top-p (temperature 0: greedy).
- `fit_prompt`: the token ids of a conversation through the tokenizer's chat template (or of a plain text when it
  has none), the oldest turns dropped until the prompt leaves room for the reply in the model's context.
- `stream_reply`: `generate()` in a thread, the reply's text yielded piece by piece (`TextIteratorStreamer`).
- `build_page(folder)`: for a causal LM, a chat with streamed replies and the sampling settings as controls; for
  a classifier, a text box and each label's score. `launch_page` starts it on this machine (no analytics, no
  fonts from the internet: the page fetches nothing but from its own server).
"""

import json
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TextIteratorStreamer,
)


# The page's default settings: the book's chapter 5 sampling (temperature scaling and top-k), and a reply length
# that a small model's context can hold.
DEFAULT_SAMPLING = dict(temperature=0.7, top_k=50, top_p=1.0, max_new_tokens=128)
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # Gradio's theme otherwise loads Google Fonts
SYSTEM_MONO_FONTS = ["ui-monospace", "Consolas", "monospace"]


# ----------------------------------------------------------------------------------------------------------
# The model, the prompt and the reply


def load_model(folder: str | os.PathLike, *, trust_remote_code: bool = False, dtype: str = "float32"):
    """(model, tokenizer) of a saved causal LM or sequence classifier, the class read from its config.json, with
    its weights in `dtype`."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    auto_class = AutoModelForSequenceClassification if is_classifier(config) else AutoModelForCausalLM
    model = auto_class.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def is_classifier(config) -> bool:
    return any(name.endswith("ForSequenceClassification") for name in config.architectures or [])


def context_length(config) -> int:
    """The longest sequence the model reads: `max_position_embeddings` (ScratchGPT, GPT-2 and most models)."""
    return config.max_position_embeddings


def sampling_kwargs(temperature: float, top_k: int, top_p: float) -> dict:
    """`generate()`'s sampling arguments: temperature 0 is greedy decoding, top_k 0 keeps every token."""
    if temperature == 0:
        return dict(do_sample=False)
    return dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)


@dataclass
class Prompt:
    """What the model reads for the next reply."""

    ids: list[int]
    messages: list[dict]  # the conversation that fits, ending with the user's message
    dropped_turns: int  # messages of the oldest exchanges left out (user and assistant turns)
    cut_tokens: int  # tokens cut from the start of a single message longer than the context allows
    max_new_tokens: int  # the reply's length at most: what is asked, within the context


def fit_prompt(tokenizer, messages: Sequence[dict], context: int, max_new_tokens: int) -> Prompt:
    """The ids of `messages` (a system turn if any, then user and assistant turns ending with the user's) for the
    next reply, leaving `max_new_tokens` (at most half the context) for it: the oldest exchanges are dropped
    first; a last message still too long loses its start (its own tokens: the template around it stays whole).

    With a chat template the messages go through it, with the generation prompt. Without one (a pretrained-only
    model), the prompt is the last message's text, to be continued.
    """
    reply_room = max(1, min(max_new_tokens, context // 2))
    budget = context - reply_room
    system = list(messages[:1]) if messages and messages[0]["role"] == "system" else []
    turns = list(messages[len(system):])
    if tokenizer.chat_template is None:
        system, turns = [], turns[-1:]  # a completion: earlier messages are not part of it
    dropped = 0
    while True:
        ids = _encode(tokenizer, system + turns)
        later_user = [i for i, turn in enumerate(turns) if turn["role"] == "user" and i > 0]
        if len(ids) <= budget or not later_user:
            break
        dropped += later_user[0]  # the oldest exchange: its user turn and the replies to it
        turns = turns[later_user[0]:]
    cut = 0
    if len(ids) > budget and tokenizer.chat_template is not None:
        ids, turns, cut = _cut_message_start(tokenizer, system, turns, budget)
    if len(ids) > budget:  # a completion's text, or a template too long by itself: the prompt loses its start
        cut += len(ids) - budget
        ids = ids[-budget:]
    return Prompt(ids, system + turns, dropped, cut, min(max_new_tokens, context - len(ids)))


def _cut_message_start(tokenizer, system: list[dict], turns: list[dict], budget: int):
    """The prompt's ids, its turns and the tokens cut, with the first tokens of the last message left out until the
    prompt fits (the chat template, its instruction headers and the system message kept whole)."""
    ids = _encode(tokenizer, system + turns)
    if len(_encode(tokenizer, [*system, *turns[:-1], {**turns[-1], "content": ""}])) > budget:
        return ids, turns, 0  # the rest alone is too long (a long system message): the prompt's start is cut instead
    content = tokenizer(turns[-1]["content"], add_special_tokens=False).input_ids
    keep = len(content)
    while len(ids) > budget and keep > 0:  # the tail decoded and encoded again can differ by a token: measure
        keep = max(0, keep - (len(ids) - budget))
        tail = tokenizer.decode(content[len(content) - keep:]).lstrip("\ufffd")  # no half of a character
        turns = [*turns[:-1], {**turns[-1], "content": tail}]
        ids = _encode(tokenizer, system + turns)
    return ids, turns, len(content) - keep


def _encode(tokenizer, messages: list[dict]) -> list[int]:
    if tokenizer.chat_template is None:
        return tokenizer(messages[-1]["content"]).input_ids
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def stream_reply(model, tokenizer, ids: Sequence[int], *, max_new_tokens: int, **sampling) -> Iterator[str]:
    """Generate after `ids` in a thread and yield the reply's text piece by piece, special tokens left out; the
    reply ends at the model's end-of-text token or after `max_new_tokens`. An error in `generate()` is raised
    here, after the pieces that came before it."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    input_ids = torch.tensor([list(ids)], device=model.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    errors = []

    def generate():
        try:
            model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                           streamer=streamer, pad_token_id=pad_id, **sampling)
        except Exception as err:  # raised in the caller's thread below
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    yield from (piece for piece in streamer if piece)
    thread.join()
    if errors:
        raise errors[0]


@torch.no_grad()
def label_scores(model, tokenizer, text: str) -> dict[str, float]:
    """Each label's probability for `text`, cut to the length the classifier was trained with (the tokenizer's
    `model_max_length`, as the classification recipe saves it) and to the model's context."""
    max_length = min(tokenizer.model_max_length, context_length(model.config))
    batch = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt").to(model.device)
    probabilities = model(**batch).logits[0].float().softmax(-1)
    return {model.config.id2label[i]: p for i, p in enumerate(probabilities.tolist())}


# ----------------------------------------------------------------------------------------------------------
# The web page


def build_page(folder: str | os.PathLike, *, trust_remote_code: bool = True, model=None, tokenizer=None,
               sampling: dict | None = None):
    """The Gradio page of the model saved in `folder` (or of `model` and `tokenizer`, already loaded); `sampling`
    (temperature, top_k, top_p, max_new_tokens) sets the controls' starting values, else `DEFAULT_SAMPLING`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home
    import gradio as gr

    if model is None:
        model, tokenizer = load_model(folder, trust_remote_code=trust_remote_code)
    title = f"ScratchGPT: {Path(folder).resolve().name}"
    if is_classifier(model.config):
        return gr.Interface(
            fn=lambda text: label_scores(model, tokenizer, text),
            inputs=gr.Textbox(label="Text", lines=3),
            outputs=gr.Label(label="Scores", num_top_classes=len(model.config.id2label)),
            title=title,
            description="Each label's probability for the text.",
            flagging_mode="never",
            analytics_enabled=False,
            api_name="classify",
        )

    context = context_length(model.config)
    start = {**DEFAULT_SAMPLING, **(sampling or {})}

    def respond(message: str, history: list[dict], temperature, top_k, top_p, max_new_tokens):
        messages = [{"role": turn["role"], "content": _text(turn["content"])} for turn in history]
        prompt = fit_prompt(tokenizer, messages + [{"role": "user", "content": message}], context,
                            int(max_new_tokens))
        if prompt.dropped_turns:
            gr.Info(f"The conversation outgrew the model's {context}-token context: the oldest "
                    f"{prompt.dropped_turns} turns are left out.")
        reply = ""
        for piece in stream_reply(model, tokenizer, prompt.ids, max_new_tokens=prompt.max_new_tokens,
                                  **sampling_kwargs(temperature, int(top_k), top_p)):
            reply += piece
            yield reply

    mode = ("Replies follow the model's chat template." if tokenizer.chat_template is not None else
            "This model has no chat template: each message is continued as plain text.")
    return gr.ChatInterface(
        respond,
        chatbot=gr.Chatbot(label="Chat", height=420),
        textbox=gr.Textbox(placeholder="Type a message and press Enter", label="Message", scale=7),
        additional_inputs=[
            gr.Slider(0, 2, value=start["temperature"], step=0.05, label="Temperature (0: greedy)"),
            gr.Slider(0, 200, value=start["top_k"], step=1, label="Top-k (0: all tokens)"),
            gr.Slider(0.05, 1, value=start["top_p"], step=0.05, label="Top-p"),
            gr.Slider(1, context, value=min(start["max_new_tokens"], context // 2), step=1,
                      label="Max new tokens"),
        ],
        additional_inputs_accordion="Sampling",
        title=title,
        description=f"{mode} Context: {context} tokens.",
        analytics_enabled=False,
        api_name="chat",
    )


def _text(content) -> str:
    """A chat message's text: Gradio gives a string or a list of parts such as {"type": "text", "text": ...}."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)


def launch_page(page, **launch_kwargs):
    """Start `page` (`launch_kwargs`: Gradio's, such as `server_port`, `share`) with system fonts only."""
    import gradio as gr

    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS)
    return page.launch(theme=theme, **launch_kwargs)


# ----------------------------------------------------------------------------------------------------------
# A Hugging Face Space from a saved folder


SPACE_REQUIREMENTS = ["torch", "transformers>=5.24,<5.25", "gradio>=6.31,<6.32"]


def write_space_app(folder: str | os.PathLike) -> Path:
    """Make a saved model folder a Hugging Face Space too: this file as `app.py`, a `requirements.txt`, and the
    Space's settings (`sdk: gradio`, `app_file: app.py`) in the front matter of its README (the model card).
    `python app.py` in the folder serves its page; so does a Space uploaded from it. Returns the app's path."""
    folder = Path(folder)
    app = folder / "app.py"
    shutil.copyfile(__file__, app)
    (folder / "requirements.txt").write_text("\n".join(SPACE_REQUIREMENTS) + "\n")
    readme = folder / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    gradio_pin = next(requirement for requirement in SPACE_REQUIREMENTS if requirement.startswith("gradio"))
    sdk_version = gradio_pin.split(">=")[1].split(",")[0] + ".0"  # the version the page was tested with
    header = {"sdk": "gradio", "sdk_version": sdk_version, "app_file": "app.py"}
    lines = [f"{key}: {json.dumps(value)}" for key, value in header.items()]
    if text.startswith("---\n"):
        end = text.index("\n---", 4)
        kept = [line for line in text[4:end].splitlines() if line.split(":")[0] not in header]
        text = "---\n" + "\n".join(kept + lines) + text[end:]
    else:
        text = "---\n" + "\n".join(lines) + "\n---\n" + text
    readme.write_text(text)
    return app


if __name__ == "__main__":
    # In a model folder or a Space: the page of the model beside this file (GRADIO_SERVER_PORT picks the port).
    launch_page(build_page(Path(__file__).resolve().parent))
