"""Benchmark of pretraining data past memory: time and peak memory of preparing a large corpus, and of a run on it.

    python benchmarks/pretrain_data.py                       # a generated corpus of 100 MB, then of 1 GB
    python benchmarks/pretrain_data.py --sizes 20 --num_proc 2

For each size, a text file of that many MB is generated in a temporary folder (deleted at the end) from Python's
language reference (`default_corpus()`, paragraphs drawn at random). Then, each in a fresh process:

- first run: `recipes/pretrain.py` with GPT-2's tokenizer, the default model, one training step and 16 validation
  windows, on an empty token cache: it tokenizes the corpus (`--num_proc`) into token ids on disk, then trains;
- rerun: the same command with another output folder: the token ids are found on disk;
- tokenizing speed: on the corpus' first `--speed_mb` MB, `token_store` (read the file, tokenize in `--num_proc`
  processes, write the ids) against `tokenizers`' own batch encoding of the same text in memory
  (`Tokenizer.encode_batch_fast`, its threads on every core, batches of 256 pieces of 64K characters), three rounds
  alternating the two in one process, medians.

"prepare" is the time of `pretraining_windows` inside the run (read, tokenize, write, open the windows); its peak
memory is the main process' peak resident size until then (`VmHWM`; the model is built by then), and that of the
largest tokenizing worker (`RUSAGE_CHILDREN`). "training step" is the peak resident size from there (VmHWM reset
through `/proc/self/clear_refs`) to the end of the training step: model, AdamW state, one batch of 16 x 128
tokens; "whole run" adds the final evaluation (16 windows in one batch, a loss-only evaluation: no logits) and
the save. Resident size counts the pages of the memory-mapped token ids that
were read, which the operating system can drop and shares between processes.
"""

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT2 = ROOT.parent / "shared" / "data" / "gpt2"
MB = 1_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="corpus sizes, MB")
    parser.add_argument("--num_proc", type=int, default=1, help="tokenizing processes (1: tokenizers' threads)")
    parser.add_argument("--speed_mb", type=int, default=20, help="MB of text the tokenizing speed is measured on")
    parser.add_argument("--tokenizer", default=str(GPT2), help="folder with GPT-2's encoder.json and vocab.bpe")
    parser.add_argument("--tmp", default=None, help="where the corpus and the token ids go (default: a temp folder)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {memory_gb():.0f} GB; Python {platform.python_version()}; "
          f"--num_proc {args.num_proc}")
    rows, started = [], time.perf_counter()
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.tmp, prefix="pretrain-data-") as tmp:
            rows.append(measure(Path(tmp), size, args))
    print_table(rows)
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


def measure(tmp: Path, size_mb: int, args) -> dict:
    corpus = tmp / "corpus.txt"
    seconds = generate_corpus(corpus, size_mb * MB)
    print(f"\n{size_mb} MB corpus written in {seconds:.0f} s: {corpus.stat().st_size / MB:.0f} MB")
    runs = {}
    for name in ("first run", "rerun"):
        runs[name] = run_child(["run", str(corpus), str(tmp / name.replace(" ", "-")), str(tmp / "tokens"),
                                args.tokenizer, str(args.num_proc)])
        print(f"  {name}: {json.dumps(runs[name])}")
    speed = run_child(["throughput", str(corpus), args.tokenizer, str(min(args.speed_mb, size_mb)),
                       str(args.num_proc), str(tmp)])
    print(f"  tokenizing: {json.dumps(speed)}")
    return dict(size_mb=size_mb, speed=speed, **runs)


def generate_corpus(path: Path, size: int) -> float:
    """Paragraphs of Python's language reference drawn at random (seed 0) until the file holds `size` bytes."""
    from hf_scratchgpt.data import default_corpus

    start = time.perf_counter()
    paragraphs = [p for document in default_corpus() for p in document.split("\n\n") if p.strip()]
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as file:
        written = 0
        while written < size:
            block = "\n\n".join(rng.choices(paragraphs, k=2000)) + "\n\n"
            file.write(block)
            written += len(block.encode())
    return time.perf_counter() - start


def run_child(arguments: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", *arguments], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"child {arguments[0]} failed: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# What runs in the fresh processes


def child(arguments: list[str]) -> None:
    kind, *rest = arguments
    print(json.dumps(run_recipe(*rest) if kind == "run" else throughput(*rest)))


def run_recipe(corpus: str, output_dir: str, cache_dir: str, tokenizer: str, num_proc: str) -> dict:
    """recipes/pretrain.py for one step, timing and measuring its data preparation apart from the rest."""
    import importlib.util
    import io
    from contextlib import redirect_stdout

    spec = importlib.util.spec_from_file_location("pretrain", ROOT / "recipes" / "pretrain.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    measured = {}
    prepare = recipe.pretraining_windows

    def timed_prepare(*args, **kwargs):
        start = time.perf_counter()
        windows = prepare(*args, **kwargs)
        measured.update(prepare_s=time.perf_counter() - start, prepare_peak_mb=peak_rss_mb(reset=True),
                        num_tokens=windows["train"].store.num_tokens + windows["validation"].store.num_tokens,
                        reused=windows["train"].store.reused)
        return windows

    training_step = recipe.ScratchGPTTrainer.training_step

    def measured_step(self, *args, **kwargs):
        loss = training_step(self, *args, **kwargs)
        measured.update(step_peak_mb=peak_rss_mb())  # since the windows were ready: model, AdamW, one batch
        return loss

    recipe.pretraining_windows = timed_prepare
    recipe.ScratchGPTTrainer.training_step = measured_step
    start = time.perf_counter()
    with redirect_stdout(io.StringIO()):  # the recipe's own report; the last line of stdout is ours
        recipe.main([
            "--train_file", corpus, "--tokenizer", tokenizer, "--num_proc", num_proc, "--data_cache_dir", cache_dir,
            "--output_dir", output_dir, "--max_steps", "1", "--max_eval_samples", "16", "--eval_strategy", "no",
            "--save_strategy", "no", "--sample_max_new_tokens", "5", "--tensorboard", "false", "--disable_tqdm", "true",
            "--logging_steps", "1",
        ])
    measured.update(
        run_s=time.perf_counter() - start,
        run_peak_mb=peak_rss_mb(),
        worker_peak_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    )
    return measured


def throughput(corpus: str, tokenizer: str, limit_mb: str, num_proc: str, tmp: str) -> dict:
    """Characters per second of `token_store` (read, tokenize in `num_proc` processes, write) and of `tokenizers`'
    batch encoding alone, on the corpus' first `limit_mb` MB: three rounds alternating the two, medians."""
    from hf_scratchgpt.data.corpus_pieces import PIECE_CHARS, CorpusPart
    from hf_scratchgpt.data.token_store import token_store
    from hf_scratchgpt.tokenization import gpt2_tokenizer_from_dir

    sample = Path(tmp) / "sample.txt"
    with open(sample, "w", encoding="utf-8") as file:
        text = next(read_chunks(corpus, int(limit_mb) * MB))
        file.write(text)
    tokenizer = gpt2_tokenizer_from_dir(tokenizer)
    pieces = [text[i : i + PIECE_CHARS] for i in range(0, len(text), PIECE_CHARS)]
    ours, theirs = [], []
    for attempt in range(3):
        start = time.perf_counter()
        token_store(CorpusPart((sample,)), tokenizer, num_proc=int(num_proc), cache_dir=Path(tmp) / f"store-{attempt}")
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        for first in range(0, len(pieces), 256):
            tokenizer.backend_tokenizer.encode_batch_fast(pieces[first : first + 256], add_special_tokens=False)
        theirs.append(time.perf_counter() - start)
    median = lambda values: sorted(values)[1]  # noqa: E731
    return dict(characters=len(text), ours_s=median(ours), reference_s=median(theirs))


def read_chunks(path: str, size: int):
    with open(path, encoding="utf-8") as file:
        while chunk := file.read(size):
            yield chunk


def peak_rss_mb(reset: bool = False) -> float:
    """This process' peak resident size so far (VmHWM), in MB; `reset` starts a new peak from the current size."""
    status = Path("/proc/self/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return peak


# ----------------------------------------------------------------------------------------------------------
# The table


def print_table(rows: list[dict]) -> None:
    print("\n| corpus | run | prepare | prepare peak (main / worker) | training step peak | whole run: peak, time |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        for name in ("first run", "rerun"):
            run = row[name]
            worker = f"{run['worker_peak_mb']:,.0f} MB" if run["worker_peak_mb"] else "-"
            print(f"| {row['size_mb']:,} MB | {name} | {run['prepare_s']:.1f} s | {run['prepare_peak_mb']:,.0f} MB / "
                  f"{worker} | {run['step_peak_mb']:,.0f} MB | {run['run_peak_mb']:,.0f} MB, {run['run_s']:.1f} s |")
    print("\n| corpus | tokens | rerun's prepare / first's | tokenizing: token_store | tokenizers' encode_batch_fast | "
          "ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        first, rerun, speed = row["first run"], row["rerun"], row["speed"]
        ours, theirs = speed["characters"] / speed["ours_s"] / MB, speed["characters"] / speed["reference_s"] / MB
        print(f"| {row['size_mb']:,} MB | {first['num_tokens']:,} | {rerun['prepare_s'] / first['prepare_s']:.1%} | "
              f"{ours:.2f} M chars/s | {theirs:.2f} M chars/s | {ours / theirs:.2f} |")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


if __name__ == "__main__":
    main()
