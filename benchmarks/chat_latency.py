"""Chapter 7, talking to the model: time to the first token and tokens per second of one chat reply, for GPT-2
small's shape on this machine, along the three ways the project streams a reply.

    python benchmarks/chat_latency.py [--max_new_tokens 64] [--runs 3] [--threads N]

The model: random weights of GPT-2 small's shape (124M parameters, context 1,024), GPT-2's tokenizer with chapter
7's chat template, saved to a temporary folder; the end-of-text token is suppressed in its generation config, so
that every path makes exactly `--max_new_tokens` tokens. Greedy decoding; the same prompt, a one-message
conversation through the chat template. The paths, each timed from where its user waits:

- scratchgpt-generate: `hf_scratchgpt.generate.generate_text` with the template's text as `--prompt`, its
  `TextStreamer` timed: from the prompt entering `generate()` to each new token. The command loads the model each
  time it runs; loading is left out, but the first forward passes of a freshly loaded model are in.
- the page's reply stream alone: `hf_scratchgpt.app.stream_reply` (what the page and the terminal chat stream,
  `generate()` in a thread with a `TextIteratorStreamer`) on a model loaded once, in this process: from the call
  to each piece of text.
- web page: `scratchgpt-chat --web`'s page (`hf_scratchgpt.app.build_page`) served by Gradio on 127.0.0.1, asked
  through Gradio's client (`Client.submit`, streamed): from the request to each update of the reply.
- transformers serve: the export to GPT-2 (`scratchgpt-export --to gpt2`) served by `transformers serve`, asked by
  the `openai` client with `stream=True`: from the request to each chunk.

Time to first token (TTFT) is the wait for the first text; tokens/s is the new tokens after the first over the time
from the first to the last. Each figure is the median of `--runs` replies after one warm-up reply, the paths taking
turns run by run. `--threads 1` keeps a shared machine's other work from distorting the comparison (see README).
"""

import argparse
import contextlib
import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch
import transformers
from transformers import AutoTokenizer, TextStreamer

import hf_scratchgpt.generate as generate
from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM
from hf_scratchgpt.app import build_page, launch_page, load_model, stream_reply
from hf_scratchgpt.data.instruction import add_chat_template
from hf_scratchgpt.export import export_to_gpt2
from hf_scratchgpt.tokenization import gpt2_tokenizer_from_dir

ROOT = Path(__file__).resolve().parents[1]
MESSAGE = "Give three tips for staying healthy."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpt2_dir", default=str(ROOT.parent / "shared" / "data" / "gpt2"),
                        help="GPT-2's vocabulary files (encoder.json, vocab.bpe)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="timed replies per path, after one warm-up")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads, here and in the server (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for `transformers serve`, a process of its own

    with tempfile.TemporaryDirectory() as tmp:
        folder, exported = save_models(Path(tmp), args.gpt2_dir)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        messages = [{"role": "user", "content": MESSAGE}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        n_prompt = len(tokenizer(prompt).input_ids)
        model, _ = load_model(folder)
        ids = tokenizer(prompt).input_ids
        paths = {
            "scratchgpt-generate (the command: model loaded per run)": lambda: time_generate(folder, prompt,
                                                                                             args.max_new_tokens),
            "the page's reply stream alone (`stream_reply`, in process)": lambda: time_stream(model, tokenizer, ids,
                                                                                              args.max_new_tokens),
            "web page through Gradio's client (HTTP, queue)": page_timer(folder, args.max_new_tokens),
            "transformers serve (openai, streamed)": serve_timer(exported, messages, args.max_new_tokens),
        }
        for timer in paths.values():
            timer()  # warm-up
        results = {name: [] for name in paths}
        for run in range(args.runs):  # the paths in turn, run by run: a busy moment of the machine hits them all
            for name, timer in paths.items():
                results[name].append(timer())
            print(f"run {run + 1} of {args.runs} done", file=sys.stderr)
        close_all()
    print_table(results, args, n_prompt)


def save_models(tmp: Path, gpt2_dir: str) -> tuple[Path, Path]:
    """The random GPT-2-small-shaped ScratchGPT with its tokenizer and chat template, and its export to GPT-2."""
    folder = tmp / "scratchgpt"
    torch.manual_seed(0)
    model = ScratchGPTForCausalLM(ScratchGPTConfig.from_preset("gpt2-small", bos_token_id=50256, eos_token_id=50256))
    model.generation_config.suppress_tokens = [50256]  # no early end: every path makes max_new_tokens tokens
    model.save_pretrained(folder)
    add_chat_template(gpt2_tokenizer_from_dir(gpt2_dir)).save_pretrained(folder)
    return folder, export_to_gpt2(folder, tmp / "gpt2")


def timing(start: float, stamps: list[float], n_tokens: int) -> dict:
    """TTFT, and tokens/s after the first token, from the times at which the reply's text grew."""
    first, last = stamps[0] - start, stamps[-1] - start
    return {"ttft": first, "tokens_per_s": (n_tokens - 1) / (last - first), "total": last}


class TimedStreamer(TextStreamer):
    """scratchgpt-generate's streamer, noting when the prompt arrives and when each new token does."""

    stamps: list[float] = []

    def put(self, value):
        TimedStreamer.stamps.append(time.perf_counter())
        super().put(value)


def time_generate(folder: Path, prompt: str, max_new_tokens: int) -> dict:
    TimedStreamer.stamps = []
    argv = [str(folder), "--prompt", prompt, "--max_new_tokens", str(max_new_tokens), "--temperature", "0"]
    with contextlib.redirect_stdout(io.StringIO()), _patched(generate, "TextStreamer", TimedStreamer):
        generate.generate_text(argv)
    start, *tokens = TimedStreamer.stamps  # the first put is the prompt
    return timing(start, tokens, len(tokens))


def time_stream(model, tokenizer, ids: list[int], max_new_tokens: int) -> dict:
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in stream_reply(model, tokenizer, ids, max_new_tokens=max_new_tokens,
                                                        do_sample=False)]
    return timing(start, stamps, max_new_tokens)


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


_TO_CLOSE = []


def close_all() -> None:
    for close in _TO_CLOSE:
        close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def page_timer(folder: Path, max_new_tokens: int):
    """Serve the chat page in this process and time replies through Gradio's client."""
    from gradio_client import Client

    page = build_page(folder, trust_remote_code=False)
    _, url, _ = launch_page(page, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True)
    _TO_CLOSE.append(page.close)
    client = Client(url, verbose=False)

    def reply() -> dict:
        start = time.perf_counter()
        job = client.submit(MESSAGE, 0, 50, 1.0, max_new_tokens, api_name="/chat")
        stamps = [time.perf_counter() for text in job if text]
        return timing(start, stamps, max_new_tokens)

    return reply


def serve_timer(exported: Path, messages: list[dict], max_new_tokens: int):
    """Start `transformers serve` on the export and time streamed chat completions through the openai client."""
    from openai import OpenAI

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1"}
    server = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", str(exported),
                               "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    _TO_CLOSE.append(lambda: (server.terminate(), server.wait(timeout=30)))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(240):
        with contextlib.suppress(OSError):
            if opener.open(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                break
        time.sleep(0.5)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)

    def reply() -> dict:
        start = time.perf_counter()
        stream = client.chat.completions.create(model=str(exported), messages=messages, max_tokens=max_new_tokens,
                                                temperature=0, stream=True)
        stamps = [time.perf_counter() for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
        return timing(start, stamps, max_new_tokens)

    return reply


def print_table(results: dict, args, n_prompt: int) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    print(f"machine: {cpu or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, fp32")
    print(f"GPT-2 small's shape (124M, random weights), greedy, a {n_prompt}-token prompt, {args.max_new_tokens} new "
          f"tokens; median of {args.runs} replies after a warm-up")
    print()
    print("| path | time to first token | tokens/s after it | whole reply |")
    print("| --- | ---: | ---: | ---: |")
    for name, runs in results.items():
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"| {name} | {median['ttft'] * 1000:,.0f} ms | {median['tokens_per_s']:.1f} | {median['total']:.2f} s |")


if __name__ == "__main__":
    main()
