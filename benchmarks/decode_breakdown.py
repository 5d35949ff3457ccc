"""Chapter 4's generation loop, one decode step taken apart: where a batch-1 step's time goes on this machine.

    python benchmarks/decode_breakdown.py                     # GPT-2 small, float32 and bfloat16: under a minute
    python benchmarks/decode_breakdown.py --dtypes float32 --rounds 11 --json decode.json

A batch-1 decode step is bound by reading the weights once, so the step is set against that limit and against its
own matrix-vector products. For each dtype in turn, the process builds ScratchGPT (random weights, GPT-2 small's
shape, context 1,024, as `bench.py` does), lets `DecodeLinear` measure its ways in a first `generate()`, then times
in turn, `--rounds` rounds after a warm-up, each figure the median:

- read: the best of 5 `torch.sum`s over 256 MiB, the bandwidth of the weight-read limit (the bytes of the blocks
  and the head over it);
- products: the step's matrix-vector products (4 a block and the head) back to back, on the model's own weights,
  each way `DecodeLinear` can take (`kernel`, `kernel-nt`, `linear`, `split`), and in the ways it chose (each run
  the median of 11 passes, as many as the steps of a run), and in the ways chosen on copies of the weights on 2 MB
  pages (where Linux gives them: what `SCRATCHGPT_HUGE_PAGES=1` moves the weights to, off by default);
- step: the time between two tokens inside `generate()` after a 100-token prompt (`bench.py`'s `StepClock`),
  with the fused decode step (`fused_decode_block`, the default) and with each block's own forward.

The step minus the chosen products is what the step spends beyond reading its weights: the model's and
`generate()`'s Python, the attention, the norms and the calls. The table's first line names the machine.
"""

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch

import bench
from hf_scratchgpt import modeling_scratchgpt
from hf_scratchgpt.speedups_scratchgpt import (
    DecodeLinear,
    decode_kernels,
    movable_to_huge_pages,
    transparent_huge_pages,
)

PROMPT_TOKENS = 100


def products_run(layers: list[DecodeLinear], way: str | None, passes_per_run: int) -> Callable[[], float] | None:
    """A run that times each layer's product of one row back to back, all the way `way` (None: the way
    `DecodeLinear` chose for each), the median of `passes_per_run` passes; None where some layer cannot take that
    way here."""
    threads = torch.get_num_threads()
    calls = []
    for layer in layers:
        x = torch.randn(1, layer.in_features, dtype=layer.weight.dtype)
        ways = layer._ways(x, threads)
        chosen = way or layer.decode_way(1, threads)
        if chosen not in ways:
            return None
        calls.append(ways[chosen])
    return back_to_back(calls, passes_per_run)


def back_to_back(calls: list[Callable[[], object]], passes_per_run: int) -> Callable[[], float]:
    """A run that makes the calls one after another, `passes_per_run` times, and returns the median pass's seconds
    (the median, as a step's figure is the median of a generate()'s steps)."""

    @torch.no_grad()  # as in generate(): the weights require gradients
    def run() -> float:
        passes = []
        for _ in range(passes_per_run):
            start = time.perf_counter()
            for call in calls:
                call()
            passes.append(time.perf_counter() - start)
        return statistics.median(passes)

    return run


def huge_page_products_run(layers: list[DecodeLinear], passes_per_run: int) -> Callable[[], float] | None:
    """`products_run` in the ways chosen, on copies of the weights that `SCRATCHGPT_HUGE_PAGES=1` moves onto 2 MB pages
    (`movable_to_huge_pages`: 2 MB and more) made as it makes them (`huge_page_copy`), the others as they are; None
    where Linux gives no such pages, the kernels are not built, or a way is the split (not run on copies)."""
    kernels, threads = decode_kernels(), torch.get_num_threads()
    if kernels is None or not transparent_huge_pages():
        return None
    calls = []
    for layer in layers:
        weight, way = layer.weight.detach(), layer.decode_way(1, threads)
        if movable_to_huge_pages(weight):
            weight = kernels.huge_page_copy(weight)
        x = torch.randn(1, layer.in_features, dtype=weight.dtype)
        if way in ("kernel", "kernel-nt"):
            calls.append(functools.partial(kernels.decode_linear, x, weight, layer.bias, way == "kernel-nt"))
        elif way == "linear":
            calls.append(functools.partial(torch.nn.functional.linear, x, weight, layer.bias))
        else:
            return None
    return back_to_back(calls, passes_per_run)


def step_run(model, prompt: dict, settings: bench.Settings, fused: bool) -> Callable[[], float]:
    """`bench.py`'s decode step run, with the fused decode step or with every block's own forward."""
    run = bench.decode_step_run(model, prompt, settings)
    if fused:
        return run
    no_fusion = mock.patch.object(modeling_scratchgpt, "fused_decode_block", lambda *args: None)
    return no_fusion(run)  # decorated: patched during each call only


def measure(dtype: str, rounds: int, shape: str) -> dict:
    settings = bench.Settings(shapes=[shape], attns=["sdpa"], dtype=dtype, decode_new=12)
    model = bench.build_scratchgpt(shape, bench.DECODE_CONTEXT_LENGTH, "sdpa", settings).eval()
    prompt = bench.random_prompt(1, PROMPT_TOKENS, settings)
    bench.decode_step_run(model, prompt, settings)()  # DecodeLinear measures its ways here
    layers = [module for module in model.modules() if isinstance(module, DecodeLinear)]
    runs: dict[str, Callable[[], float]] = {}
    runs["read"], read_bytes = bench.read_run(settings)
    for way in ("kernel", "kernel-nt", "linear", "split", None):
        if (run := products_run(layers, way, settings.decode_new - 1)) is not None:
            runs[f"products: {way or 'the ways chosen'}"] = run
    if (run := huge_page_products_run(layers, settings.decode_new - 1)) is not None:
        runs["products: chosen, 2 MB pages"] = run
    runs["step: fused blocks"] = step_run(model, prompt, settings, fused=True)
    runs["step: blocks' own forward"] = step_run(model, prompt, settings, fused=False)
    samples = bench.alternate(runs, rounds, warmup=1)
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    weight_bytes = bench.decode_weight_bytes(model)
    product_bytes = sum(layer.weight.nbytes + (layer.bias.nbytes if layer.bias is not None else 0) for layer in layers)
    bandwidth = read_bytes / seconds.pop("read")
    threads = torch.get_num_threads()
    chosen = [layer.decode_way(1, threads) for layer in layers]
    return {
        "dtype": dtype,
        "read_gb_s": bandwidth / 1e9,
        "limit_ms": 1e3 * weight_bytes / bandwidth,
        "product_mb": product_bytes / 1e6,
        "ms": {name: 1e3 * value for name, value in seconds.items()},
        "ways_chosen": {way: chosen.count(way) for way in sorted(set(chosen))},
        "samples": samples,
    }


def print_table(results: list[dict]) -> None:
    print(f"{'dtype':9s} {'measure':34s} {'ms':>8s} {'GB/s':>6s} {'x limit':>8s}")
    for result in results:
        limit = result["limit_ms"]
        rows = [("weight-read limit (torch.sum)", limit, result["read_gb_s"])]
        for name, ms in result["ms"].items():
            rows.append((name, ms, result["product_mb"] / ms if name.startswith("products") else None))
        beyond = result["ms"]["step: fused blocks"] - result["ms"]["products: the ways chosen"]
        rows.append(("step beyond its products (fused)", beyond, None))
        for name, ms, gb_s in rows:
            gb_s_text = f"{gb_s:6.1f}" if gb_s is not None else ""
            print(f"{result['dtype']:9s} {name:34s} {ms:8.2f} {gb_s_text:>6s} {ms / limit:7.2f}x")
        ways = ", ".join(f"{way} x{count}" for way, count in result["ways_chosen"].items())
        print(f"{result['dtype']:9s} ways chosen: {ways}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated, of float32 and bfloat16")
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds, each figure their median")
    parser.add_argument("--shape", default="gpt2-small", choices=list(bench.SHAPES))
    parser.add_argument("--json", metavar="PATH", help="also write every figure and raw sample there")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    unknown = [dtype for dtype in dtypes if dtype not in ("float32", "bfloat16")]
    if unknown:
        parser.error(f"unknown dtype(s) {unknown}; choose from float32, bfloat16")
    env = bench.environment(bench.Settings(shapes=[args.shape], attns=["sdpa"]))
    print(f"One decode step of {args.shape} at batch 1 after {PROMPT_TOKENS} tokens: {bench.describe_machine(env)}")
    results = [measure(dtype, args.rounds, args.shape) for dtype in dtypes]
    print_table(results)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"environment": env, "results": results}, out, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
