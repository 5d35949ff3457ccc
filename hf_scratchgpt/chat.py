"""Chapter 7, talking to the instruction-tuned model: `scratchgpt-chat`, a conversation in the terminal or a web page.

    scratchgpt-chat runs/instruct-cpu                       # in the terminal: /reset, /exit
    scratchgpt-chat runs/instruct-cpu --temperature 0.7 --top_k 40 --max_new_tokens 100 --seed 1
    scratchgpt-chat runs/instruct-cpu --web --port 7860     # a Gradio page (--share: a public link)
    python -m hf_scratchgpt.chat FOLDER_OR_HUB_ID ...

Each message goes to the model through the tokenizer's chat template (chapter 7's Alpaca prompt, which the
instruction recipe saves) with the whole conversation before it, and the reply streams token by token. When the
conversation outgrows the model's context, the oldest exchanges are dropped, and the chat says so. A model without
a chat template (pretrained only) continues each message as plain text. `--web` serves the page of `app.py`:
a chat for a language model, each label's score for a classifier (chapter 6).
"""

import argparse
import errno
import socket
import sys

import torch
from transformers import AutoConfig

from .app import (
    build_page,
    context_length,
    fit_prompt,
    is_classifier,
    launch_page,
    load_model,
    sampling_kwargs,
    stream_reply,
)
from .generate import add_sampling_arguments, check_sampling_arguments
from .hub import check_model_folder


PROG = "scratchgpt-chat"
COMMANDS = {"/reset": "clear the conversation", "/exit": "end the chat"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model folder or a Hub id")
    add_sampling_arguments(parser, max_new_tokens=128)
    parser.add_argument("--system", default=None, help="a system message (replaces the template's first line)")
    parser.add_argument("--web", action="store_true", help="serve a web page (Gradio) instead of the terminal chat")
    parser.add_argument("--host", default="127.0.0.1", help="with --web: the address to listen on")
    parser.add_argument("--port", type=int, default=None, help="with --web: the port (default: Gradio's, 7860 up)")
    parser.add_argument("--share", action="store_true", help="with --web: a public gradio.live link as well")
    parser.add_argument("--trust_remote_code", action="store_true", help="load a folder's own code")
    args = parser.parse_args(argv)
    check_sampling_arguments(parser, args)
    if not args.web and (args.port is not None or args.share):
        parser.error("--port and --share go with --web")
    if args.web and args.system is not None:
        parser.error("--system goes with the terminal chat, not --web")
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port must be in 1-65535, got {args.port}")
    return args


def main(argv=None) -> None:
    """The `scratchgpt-chat` command: exit status 0 when the chat ends, 1 with one line when it cannot start."""
    args = parse_args(argv)
    import hf_scratchgpt  # noqa: F401  registers ScratchGPT with the Auto classes

    check_model_folder(PROG, args.model)
    if args.web and args.port is not None:
        check_port(args.host, args.port)
    try:
        if not args.web and is_classifier(AutoConfig.from_pretrained(args.model,
                                                                     trust_remote_code=args.trust_remote_code)):
            sys.exit(f"{PROG}: error: {args.model} holds a classifier, not a language model: its page is "
                     f"`{PROG} {args.model} --web`")
        model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
    except (OSError, ValueError) as err:
        sys.exit(f"{PROG}: error: cannot load {args.model}: {str(err).strip().splitlines()[0]}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.web:
        sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        max_new_tokens=args.max_new_tokens)
        page = build_page(args.model, model=model, tokenizer=tokenizer, sampling=sampling)
        try:
            launch_page(page, server_name=args.host, server_port=args.port, share=args.share)
        except OSError as err:  # the port taken between our check and Gradio's start
            sys.exit(f"{PROG}: error: cannot serve on {args.host}:{args.port}: {str(err).strip().splitlines()[0]}")
        return
    chat_in_terminal(model, tokenizer, args)


def check_port(host: str, port: int) -> None:
    """Exit with one line, before any model is loaded, when `port` cannot be listened on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server binds: only a listener stops it
        try:
            sock.bind((host, port))
        except OSError as err:
            reason = "is in use" if err.errno == errno.EADDRINUSE else f"cannot be used ({err.strerror})"
            sys.exit(f"{PROG}: error: port {port} on {host} {reason}: choose another with --port")


def chat_in_terminal(model, tokenizer, args: argparse.Namespace) -> None:
    """Read messages from stdin until /exit or the end of input; stream each reply to stdout."""
    context = context_length(model.config)
    sampling = sampling_kwargs(args.temperature, args.top_k, args.top_p)
    templated = tokenizer.chat_template is not None
    print(f"Chatting with {args.model} ({context}-token context). "
          + ", ".join(f"{name}: {what}" for name, what in COMMANDS.items()) + ".")
    if not templated:
        print("It has no chat template (a pretrained-only model?): plain completion, each message is continued "
              "on its own.")
    start = [{"role": "system", "content": args.system}] if args.system and templated else []
    history = list(start)
    while True:
        try:
            message = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if message.strip() == "/exit":
            return
        if message.strip() == "/reset":
            history = list(start)
            print("(conversation cleared)")
            continue
        if not message.strip():
            continue
        prompt = fit_prompt(tokenizer, history + [{"role": "user", "content": message}], context,
                            args.max_new_tokens)
        if prompt.dropped_turns:
            print(f"(the conversation outgrew the {context}-token context: dropped its oldest "
                  f"{prompt.dropped_turns} turns)")
        if prompt.cut_tokens:
            print(f"(the message is too long for the context: its first {prompt.cut_tokens} tokens are left out)")
        print("model> ", end="", flush=True)
        reply = ""
        try:
            for piece in stream_reply(model, tokenizer, prompt.ids, max_new_tokens=prompt.max_new_tokens,
                                      **sampling):
                print(piece, end="", flush=True)
                reply += piece
        except KeyboardInterrupt:
            print("\n(stopped)")
            return
        print()
        if templated:
            history = prompt.messages + [{"role": "assistant", "content": reply}]


__all__ = ["check_port", "chat_in_terminal", "main", "parse_args"]


if __name__ == "__main__":
    main()
