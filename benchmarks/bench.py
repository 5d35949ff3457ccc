"""Benchmark of chapters 3 to 5: ScratchGPT against transformers' GPT-2, side by side, training and generating.

One process builds ScratchGPT, converts it with `to_gpt2()` (same shapes, same weights, dropout 0) and measures the
two models alternately, run by run (A B A B ...), after a warm-up; each number is the median over the runs, and
each ratio is ScratchGPT / GPT-2 from medians of the same run:

1. training: tokens/s of forward + backward + AdamW step;
2. model FLOPs utilisation: `6 N + 12 n_layers emb_dim T` FLOPs per token times tokens/s, over the fp32 matmul
   throughput measured in between the training runs (N = all parameters but the position embeddings, the tied
   head counted once);
3. generation: greedy `generate()` tokens/s with the KV cache, at batch 1 and 8;
4. decode: time per new token after 100 and 1,000 tokens of context (models of context 1,024), timed token by
   token inside `generate()` so the prefill is left out; its growth from 100 to 1,000; and the step at 100 as a
   multiple of the time to read the weights once at the read bandwidth measured in the same round (its limit; the
   median of the rounds' ratios);
5. peak memory of a training step, and of generating 24 tokens after a 1,000-token prompt, each model in a fresh
   child process (the measurements not alternated; generation's the median of 3 processes each, as one model's
   peak moves by up to 0.5% from process to process);
6. bfloat16, where the CPU has AVX-512 BF16 or AMX, on CUDA, or with `--bf16`: training under autocast (its MFU
   against the bfloat16 matmul measured in the same rounds, or `--peak-tflops`) and decoding with bfloat16
   weights, each against the same model's float32 figure, and the gap between the losses of float32 and bfloat16
   training over the first 50 steps.

The table's header line names the machine: CPU model, vendor and extensions, threads, torch, MKL and oneDNN.

Run it from the repository root:

    python benchmarks/bench.py --quick                   # small shape, under 2 minutes on 2 CPU cores
    python benchmarks/bench.py                           # small and GPT-2 small, eager and sdpa (~10-15 minutes)
    python benchmarks/bench.py --device cuda --only bf16-train --shapes gpt2-small --attn sdpa --context 1024 \
        --batch 32 --steps 8 --compile --peak-tflops 989    # the GPU row: bf16 autocast, compiled, H100's peak

`--only` picks parts (train, bf16-train, generate, decode, memory).

It prints a table with a target column (PASS/MISS) and writes every number and raw sample as JSON (default:
benchmarks/results/bench-<date>-<time>.json, a folder git ignores; `--json PATH` to choose).
"""

import argparse
import concurrent.futures
import copy
import gc
import json
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM


# The two shapes of the issue. Both have GPT-2's vocabulary and a bias on the query/key/value projection (GPT-2
# always has one; without it `to_gpt2()` would add a zero bias, and GPT-2 would do work that ScratchGPT does not).
SHAPES: dict[str, dict] = {
    "small": dict(emb_dim=256, n_layers=4, n_heads=4),
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12),  # 124M parameters
}
VOCAB_SIZE = 50257
EOS_ID = 50256  # <|endoftext|>: the padding token; the models have no end-of-text token, so no row stops early
DECODE_CONTEXTS = (100, 1000)  # tokens of context before the timed decode steps
DECODE_CONTEXT_LENGTH = 1024  # context length of the models built for the decode measurement
MODELS = ("scratchgpt", "gpt2")
SECTIONS = ("train", "bf16-train", "generate", "decode", "memory")  # the parts `--only` can pick


@dataclass
class Settings:
    """What to measure and how long; `--quick` and the command line fill it in."""

    shapes: list[str]
    attns: list[str]
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 4  # training batch
    seq: int = 256  # training sequence length
    context: int = 256  # context_length of the models for training and generation
    steps: int = 5  # measured training steps per model (rounds of A B)
    warmup: int = 2  # unmeasured training steps per model first (AdamW creates its state in the first)
    gen_rounds: int = 3  # measured generate() calls per model and batch size
    gen_batches: tuple[int, ...] = (1, 8)
    gen_prompt: int = 32  # prompt tokens of the generation measurement
    gen_new: int = 32  # new tokens per generate() call
    decode_rounds: int = 5
    memory_rounds: int = 3  # fresh processes per model for generation's peak memory (the median is kept)
    decode_new: int = 24  # new tokens after the long prompt: 1,000 + 24 fits a context of 1,024
    matmul_n: int = 2048  # side of the square matmul that measures the machine's peak
    matmul_reps: int = 3  # matmuls per timed matmul run
    compile: bool = False
    peak_tflops: float | None = None  # the device's bfloat16 peak, for the bfloat16 MFU (default: measured)
    sections: tuple[str, ...] = SECTIONS  # what to measure (`--only`)
    skip_memory: bool = False
    bf16: bool = False  # the bfloat16 rows: on by default where the CPU multiplies bfloat16 (AVX-512 BF16, AMX)
    bf16_loss_steps: int = 50  # steps of float32 and bfloat16 training whose losses are compared
    amx: bool = False  # the CPU has AMX: the bfloat16 targets apply
    seed: int = 0


@dataclass
class Target:
    """A goal of the issue for ScratchGPT: the row's ratio, or ScratchGPT's own number, compared with `threshold`."""

    on: str  # "ratio" or "scratchgpt"
    op: str  # ">=" or "<="
    threshold: float
    label: str
    tolerance: float = 0.0  # what the measurement cannot tell apart from the threshold

    def check(self, row: "Row") -> bool:
        value = row.ratio if self.on == "ratio" else row.scratchgpt
        if self.op == ">=":
            return value >= self.threshold - self.tolerance
        return value <= self.threshold + self.tolerance


@dataclass
class Row:
    """One line of the table: a measurement of both models at one shape and attention implementation."""

    shape: str
    attn: str
    measure: str
    unit: str  # "tok/s", "%", "ms", "x", "MiB"
    scratchgpt: float
    gpt2: float | None  # None where only ScratchGPT is measured
    ratio: float | None = None  # ScratchGPT / GPT-2
    target: str = ""
    passed: bool | None = None
    samples: dict = field(default_factory=dict)  # raw per-run numbers, for the JSON


# --- models -------------------------------------------------------------------------------------------------------


def make_config(shape: str, context: int, attn: str) -> ScratchGPTConfig:
    return ScratchGPTConfig(
        vocab_size=VOCAB_SIZE,
        context_length=context,
        qkv_bias=True,
        drop_rate=0.0,  # no dropout, so both models do exactly the same work
        bos_token_id=EOS_ID,
        eos_token_id=None,  # no end: every generate() call makes its max_new_tokens (see generation_config)
        pad_token_id=EOS_ID,
        attn_implementation=attn,
        **SHAPES[shape],
    )


def build_scratchgpt(shape: str, context: int, attn: str, settings: Settings) -> ScratchGPTForCausalLM:
    """ScratchGPT under a fixed seed, on the device, in the dtype."""
    torch.manual_seed(settings.seed)
    model = ScratchGPTForCausalLM(make_config(shape, context, attn))
    return model.to(device=settings.device, dtype=getattr(torch, settings.dtype))


def build_pair(shape: str, context: int, attn: str, settings: Settings) -> dict[str, torch.nn.Module]:
    """ScratchGPT and its `to_gpt2()` copy: the same weights, on the device, in the dtype."""
    ours = build_scratchgpt(shape, context, attn, settings)
    gpt2 = ours.to_gpt2()
    gpt2.config.pad_token_id = EOS_ID
    pair = {"scratchgpt": ours, "gpt2": gpt2}
    set_attn(pair, attn)
    return pair


def set_attn(pair: dict[str, torch.nn.Module], attn: str) -> None:
    for model in pair.values():
        model.set_attn_implementation(attn)
        if model.config._attn_implementation != attn:
            raise RuntimeError(f"{type(model).__name__} runs {model.config._attn_implementation!r}, not {attn!r}")


def flop_params(model: ScratchGPTForCausalLM) -> int:
    """N of `6 N`: every parameter but the position embeddings, the tied head counted once (`parameters()` yields
    a shared tensor once)."""
    return sum(p.numel() for p in model.parameters()) - model.model.pos_emb.weight.numel()


def flops_per_token(model: ScratchGPTForCausalLM, seq: int) -> int:
    """Training FLOPs per token (PaLM's appendix B): 6 N for the weights, 12 L C T for attention's two matmuls."""
    config = model.config
    return 6 * flop_params(model) + 12 * config.n_layers * config.emb_dim * seq


# --- timing -------------------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> Callable[[], float]:
    """`fn` as a measurement: it returns the seconds one call took."""

    def run() -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    return run


def alternate(runs: dict[str, Callable[[], float]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Warm each up, then call them in turn, A B A B ..., `rounds` times; each call returns its measurement."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    samples = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            samples[name].append(run())
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- 0. the machine's matmul throughput ---------------------------------------------------------------------------


def matmul_run(settings: Settings, dtype: torch.dtype | None = None) -> tuple[Callable[[], float], float]:
    """A timed run of `matmul_reps` square `torch.mm`s in `dtype` (default: the benchmark's), and the FLOPs it
    does."""
    n, dtype = settings.matmul_n, dtype or getattr(torch, settings.dtype)
    a = torch.randn(n, n, device=settings.device, dtype=dtype)
    b = torch.randn(n, n, device=settings.device, dtype=dtype)
    out = torch.empty(n, n, device=settings.device, dtype=dtype)

    def run():
        for _ in range(settings.matmul_reps):
            torch.mm(a, b, out=out)

    return timed(run, settings.device), 2 * n**3 * settings.matmul_reps


# --- 1 and 2. training throughput and model FLOPs utilisation ----------------------------------------------------


def training_step(model: torch.nn.Module, settings: Settings) -> tuple[Callable[[], float], list[float]]:
    """One forward + backward + AdamW step on a fixed random batch, as a timed run; the losses go into the list."""
    generator = torch.Generator().manual_seed(settings.seed)
    batch = torch.randint(0, VOCAB_SIZE, (settings.batch, settings.seq), generator=generator).to(settings.device)
    optimizer = make_optimizer(model, 1e-4, settings)
    forward = torch.compile(model) if settings.compile else model
    losses = []

    def step():
        loss = forward(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    model.train()
    return timed(step, settings.device), losses


def make_optimizer(model: torch.nn.Module, lr: float, settings: Settings) -> torch.optim.AdamW:
    """AdamW as Trainer makes it: fused into one kernel on CUDA (`adamw_torch_fused`)."""
    fused = True if settings.device.startswith("cuda") else None
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=fused)


def peak_flops(measured: float, dtype: torch.dtype, settings: Settings) -> float:
    """MFU's denominator: `--peak-tflops` for a 16-bit dtype where given (a datasheet's figure is for those), else
    the matmul throughput measured in the same rounds."""
    if settings.peak_tflops and dtype in (torch.bfloat16, torch.float16):
        return settings.peak_tflops * 1e12
    return measured


def measure_training(pair, shape: str, attn: str, settings: Settings) -> list[Row]:
    """Training tokens/s of both models, with the matmul run as a third in each round, and the MFU from them."""
    steps, losses = {}, {}
    for name, model in pair.items():
        steps[name], losses[name] = training_step(model, settings)
    matmul, matmul_flops = matmul_run(settings)
    samples = alternate({**steps, "matmul": matmul}, settings.steps, settings.warmup)
    for model in pair.values():
        model.eval()

    tokens = settings.batch * settings.seq
    tok_s = {name: tokens / median(samples[name]) for name in MODELS}
    matmul_flops_s = matmul_flops / median(samples["matmul"])
    peak = peak_flops(matmul_flops_s, getattr(torch, settings.dtype), settings)
    per_token = flops_per_token(pair["scratchgpt"], settings.seq)
    mfu = {name: 100 * per_token * tok_s[name] / peak for name in MODELS}
    first_losses = {name: losses[name][0] for name in MODELS}  # same weights, same batch: the same loss

    train = Row(shape, attn, "train tokens/s", "tok/s", tok_s["scratchgpt"], tok_s["gpt2"],
                tok_s["scratchgpt"] / tok_s["gpt2"],
                samples={"seconds": samples, "first_loss": first_losses, "tokens_per_step": tokens})
    utilisation = Row(shape, attn, "train MFU", "%", mfu["scratchgpt"], mfu["gpt2"], mfu["scratchgpt"] / mfu["gpt2"],
                      samples={"flops_per_token": per_token, "n_params": flop_params(pair["scratchgpt"]),
                               "matmul_gflops": matmul_flops_s / 1e9, "peak_gflops": peak / 1e9})
    return [train, utilisation]


# --- 3. generation throughput -------------------------------------------------------------------------------------


def generation_config(new_tokens: int, extra: list | None = None) -> dict:
    """Greedy decoding with the KV cache, exactly `new_tokens` tokens: the models have no end-of-text token, so no
    row stops early. (Not `min_new_tokens`: its logits processors cost a step 0.3-0.4 ms in `generate()`, an
    `isin` over the vocabulary and an `inspect.signature` each, the same for both models but no part of decoding.)"""
    config = GenerationConfig(
        do_sample=False,
        use_cache=True,
        max_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=EOS_ID,
    )
    return {"generation_config": config, "stopping_criteria": StoppingCriteriaList(extra or [])}


def random_prompt(batch: int, length: int, settings: Settings) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(settings.seed + length)
    ids = torch.randint(0, EOS_ID, (batch, length), generator=generator).to(settings.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def generate_call(model, prompt: dict, new_tokens: int, outputs: list, extra: list | None = None) -> Callable:
    def call():
        out = model.generate(**prompt, **generation_config(new_tokens, extra))
        if out.shape[1] != prompt["input_ids"].shape[1] + new_tokens:
            raise RuntimeError(f"{type(model).__name__} generated {out.shape[1]} tokens, not the prompt + {new_tokens}")
        outputs.append(out)

    return call


def measure_generation(pair, shape: str, attn: str, batch: int, settings: Settings) -> Row:
    """Generated tokens/s of a whole `generate()` call (prefill of a short prompt included) at one batch size."""
    prompt = random_prompt(batch, settings.gen_prompt, settings)
    outputs = {name: [] for name in MODELS}
    runs = {name: timed(generate_call(pair[name], prompt, settings.gen_new, outputs[name]), settings.device)
            for name in MODELS}
    samples = alternate(runs, settings.gen_rounds, warmup=1)
    tok_s = {name: batch * settings.gen_new / median(samples[name]) for name in MODELS}
    # Greedy with the same weights: the same tokens, but for near-ties that rounding flips (random weights have many).
    same_tokens = (outputs["scratchgpt"][-1] == outputs["gpt2"][-1])[:, settings.gen_prompt :].float().mean().item()
    return Row(shape, attn, f"generate tokens/s, batch {batch}", "tok/s", tok_s["scratchgpt"], tok_s["gpt2"],
               tok_s["scratchgpt"] / tok_s["gpt2"], samples={"seconds": samples, "same_tokens": same_tokens})


# --- 4. decode cost growth with the context -----------------------------------------------------------------------


class StepClock(StoppingCriteria):
    """Never stops `generate()`; notes the time as each new token comes out. The first comes right after the
    prefill, so the gaps between the notes are the decode steps alone."""

    def __init__(self, device: str):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_step_run(model, prompt: dict, settings: Settings) -> Callable[[], float]:
    """A run that generates `decode_new` tokens after `prompt` and returns the median seconds of a decode step."""

    def run() -> float:
        clock = StepClock(settings.device)
        generate_call(model, prompt, settings.decode_new, [], extra=[clock])()
        gaps = [later - earlier for earlier, later in zip(clock.times, clock.times[1:])]
        return median(gaps)

    return run


def measure_decode(pair, shape: str, attn: str, settings: Settings) -> list[Row]:
    """Seconds per decode step after 100 and after 1,000 tokens of prompt, and their ratio, for both models; the
    step at 100 against the weight-read limit, the read bandwidth measured in each round just before the decode runs."""
    per_step = {}
    for context in DECODE_CONTEXTS:
        prompt = random_prompt(1, context, settings)
        runs = {}
        if context == DECODE_CONTEXTS[0]:  # first in each round: next to ScratchGPT's steps in time
            runs["read"], read_bytes = read_run(settings)
        runs |= {name: decode_step_run(pair[name], prompt, settings) for name in MODELS}
        per_step[context] = alternate(runs, settings.decode_rounds, warmup=1)
    ms = {context: {name: 1e3 * median(per_step[context][name]) for name in MODELS} for context in DECODE_CONTEXTS}
    short, long = DECODE_CONTEXTS
    rows = [
        Row(shape, attn, f"decode ms/token, {context} context", "ms", ms[context]["scratchgpt"], ms[context]["gpt2"],
            ms[context]["scratchgpt"] / ms[context]["gpt2"], samples={"seconds_per_step": per_step[context]})
        for context in DECODE_CONTEXTS
    ]
    growth = {name: ms[long][name] / ms[short][name] for name in MODELS}
    rows.append(Row(shape, attn, f"decode growth {long}/{short} context", "x", growth["scratchgpt"], growth["gpt2"],
                    growth["scratchgpt"] / growth["gpt2"]))
    # Each round's steps against the limit at the bandwidth read in that round, then the median of the rounds: the
    # bandwidth of a virtual machine can change between rounds (by 1.5x, for minutes, on this project's).
    weight_bytes = decode_weight_bytes(pair["scratchgpt"])
    limits = [weight_bytes * seconds / read_bytes for seconds in per_step[short]["read"]]
    ratio = {name: median([step / limit for step, limit in zip(per_step[short][name], limits)]) for name in MODELS}
    bandwidth = read_bytes / median(per_step[short]["read"])
    rows.append(Row(shape, attn, "decode step / weight-read limit", "x", ratio["scratchgpt"], ratio["gpt2"],
                    ratio["scratchgpt"] / ratio["gpt2"],
                    samples={"limit_ms": 1e3 * median(limits), "read_gb_s": bandwidth / 1e9,
                             "weight_mb": weight_bytes / 1e6, "limit_ms_by_round": [1e3 * s for s in limits]}))
    return rows


# --- 4b. a decode step against the time to read the weights ----------------------------------------------------


def read_run(settings: Settings, mib: int = 256, reads: int = 5) -> tuple[Callable[[], float], int]:
    """A run that returns the best of `reads` `torch.sum`s over `mib` MiB (all threads), and the bytes each reads:
    how fast the machine reads memory, as a batch-1 decode step reads its weights."""
    data = torch.ones(mib * 2**20 // 4, device=settings.device)
    read = timed(lambda: data.sum(), settings.device)
    return (lambda: min(read() for _ in range(reads))), data.numel() * 4


def decode_weight_bytes(model: ScratchGPTForCausalLM) -> int:
    """What a batch-1 decode step must read: the blocks, the final LayerNorm and the output head (of the
    embeddings it reads one row each, nothing)."""
    body = [model.model.trf_blocks, model.model.final_norm, model.lm_head]
    return sum(param.numel() * param.element_size() for part in body for param in part.parameters())


# --- 6. bfloat16 against float32 --------------------------------------------------------------------------------


def autocast(settings: Settings, enabled: bool = True):
    device = "cuda" if settings.device.startswith("cuda") else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=enabled)


def measure_bf16_training(pair, shape: str, attn: str, fp32_rows: list[Row], settings: Settings) -> list[Row]:
    """Training tokens/s under bfloat16 autocast (what Trainer's `--bf16` does; the weights stay float32), both
    models alternating, and the speed-up over each one's float32 figure of the same run."""
    steps = {}
    for name, model in pair.items():
        step, _ = training_step(model, settings)
        steps[name] = lambda step=step: _in_autocast(step, settings)
    matmul, matmul_flops = matmul_run(settings, torch.bfloat16)
    samples = alternate({**steps, "matmul": matmul}, settings.steps, settings.warmup)
    for model in pair.values():
        model.eval()
    tokens = settings.batch * settings.seq
    tok_s = {name: tokens / median(samples[name]) for name in MODELS}
    matmul_flops_s = matmul_flops / median(samples["matmul"])
    peak = peak_flops(matmul_flops_s, torch.bfloat16, settings)
    per_token = flops_per_token(pair["scratchgpt"], settings.seq)
    mfu = {name: 100 * per_token * tok_s[name] / peak for name in MODELS}
    rows = [
        Row(shape, attn, "bf16 train tokens/s", "tok/s", tok_s["scratchgpt"], tok_s["gpt2"],
            tok_s["scratchgpt"] / tok_s["gpt2"], samples={"seconds": samples}),
        Row(shape, attn, "bf16 train MFU", "%", mfu["scratchgpt"], mfu["gpt2"], mfu["scratchgpt"] / mfu["gpt2"],
            samples={"flops_per_token": per_token, "n_params": flop_params(pair["scratchgpt"]),
                     "matmul_gflops": matmul_flops_s / 1e9, "peak_gflops": peak / 1e9}),
    ]
    for fp32 in (row for row in fp32_rows if row.measure == "train tokens/s"):  # where float32 was measured too
        speedup = {"scratchgpt": tok_s["scratchgpt"] / fp32.scratchgpt, "gpt2": tok_s["gpt2"] / fp32.gpt2}
        rows.append(Row(shape, attn, "bf16 / fp32 train tokens/s", "x", speedup["scratchgpt"], speedup["gpt2"],
                        speedup["scratchgpt"] / speedup["gpt2"]))
    return rows


def _in_autocast(step: Callable[[], float], settings: Settings) -> float:
    with autocast(settings):
        return step()


def measure_bf16_loss(shape: str, attn: str, settings: Settings) -> Row:
    """ScratchGPT trained `bf16_loss_steps` steps in float32 and under bfloat16 autocast from the same weights on
    the same batches: the largest gap between the two losses, as a share of the float32 loss."""
    losses = {}
    for bf16 in (False, True):
        model = build_scratchgpt(shape, settings.context, attn, settings).train()
        optimizer = make_optimizer(model, 3e-4, settings)
        generator = torch.Generator().manual_seed(settings.seed)
        losses[bf16] = []
        for _ in range(settings.bf16_loss_steps):
            batch = torch.randint(0, VOCAB_SIZE, (settings.batch, settings.seq), generator=generator)
            with autocast(settings, enabled=bf16):
                loss = model(input_ids=batch.to(settings.device), labels=batch.to(settings.device)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[bf16].append(loss.item())
        del model, optimizer
        gc.collect()
    gap = max(abs(bf16 - fp32) / fp32 for fp32, bf16 in zip(losses[False], losses[True]))
    return Row(shape, attn, f"bf16 loss gap, first {settings.bf16_loss_steps} steps", "%", 100 * gap, None,
               samples={"fp32": losses[False], "bf16": losses[True]})


def measure_bf16_decode(pair, shape: str, attn: str, settings: Settings) -> list[Row]:
    """A decode step at 100 tokens of context with bfloat16 weights, and its time over the float32 step's: bf16
    copies of both models timed in turn with the float32 models (a virtual machine's read bandwidth moves from
    minute to minute, so the two sides of the ratio come from the same rounds)."""
    bf16_pair = {name: copy.deepcopy(model).to(torch.bfloat16) for name, model in pair.items()}
    prompt = random_prompt(1, DECODE_CONTEXTS[0], settings)
    runs = {}
    for name in MODELS:
        runs[name] = decode_step_run(bf16_pair[name], prompt, settings)
        runs[f"{name} fp32"] = decode_step_run(pair[name], prompt, settings)
    samples = alternate(runs, settings.decode_rounds, warmup=1)
    del bf16_pair
    gc.collect()
    ms = {name: 1e3 * median(seconds) for name, seconds in samples.items()}
    share = {name: ms[name] / ms[f"{name} fp32"] for name in MODELS}
    return [
        Row(shape, attn, f"bf16 decode ms/token, {DECODE_CONTEXTS[0]} context", "ms", ms["scratchgpt"], ms["gpt2"],
            ms["scratchgpt"] / ms["gpt2"], samples={"seconds_per_step": samples}),
        Row(shape, attn, "bf16 / fp32 decode step", "x", share["scratchgpt"], share["gpt2"],
            share["scratchgpt"] / share["gpt2"]),
    ]


# --- 5. peak memory of a training step (child processes) ----------------------------------------------------------


def _rss_kib(field_name: str) -> int:
    """`VmRSS` (resident now) or `VmHWM` (resident at the highest since the last reset) of this process, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs sets the high-water mark `VmHWM` back to the resident size now."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def memory_child(which: str, shape: str, settings: Settings) -> dict[str, dict[str, int]]:
    """Run in a fresh process: one model, AdamW, a warm-up step (AdamW's state then exists), then a measured step
    for each attention implementation. Returns bytes above what the process held before the model was built:
    `resting` (weights + AdamW state), `peak` (the highest during the step) and `step` (peak - resting)."""
    cuda = settings.device.startswith("cuda")
    current = (lambda: torch.cuda.memory_allocated()) if cuda else (lambda: 1024 * _rss_kib("VmRSS"))
    baseline = current()
    model = build_scratchgpt(shape, settings.context, settings.attns[0], settings)
    if which == "gpt2":
        model = model.to_gpt2()  # the ScratchGPT copy is freed here, before the baseline matters
        gc.collect()
    run, _ = training_step(model, settings)
    run()  # warm-up: AdamW's state exists from here on
    result = {}
    for attn in settings.attns:
        model.set_attn_implementation(attn)
        gc.collect()
        resting = current() - baseline
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak_rss()
        run()
        peak = (torch.cuda.max_memory_allocated() if cuda else 1024 * _rss_kib("VmHWM")) - baseline
        result[attn] = {"resting": resting, "peak": peak, "step": peak - resting}
    return result


def in_child_processes(child: Callable, names: tuple[str, ...], shape: str, settings: Settings) -> dict:
    """`child(which, shape, settings)` for each of `names`, each in a fresh spawned process, side by side. On
    CPU the child's glibc malloc hands every block over 64 KiB straight back to the system when freed
    (`MALLOC_MMAP_THRESHOLD_`), so its resident size follows the live tensors."""
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the child's malloc at its start
    try:  # both at once: a process's peak is its own, and the two start-ups (imports) overlap
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(len(names), mp_context=spawn, max_tasks_per_child=1) as pool:
            futures = {which: pool.submit(child, which, shape, settings) for which in names}
            return {which: future.result() for which, future in futures.items()}
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def measure_memory(shape: str, settings: Settings) -> list[Row]:
    """Peak memory of a training step, each model in its own process."""
    results = in_child_processes(memory_child, MODELS, shape, settings)
    rows = []
    for attn in settings.attns:
        mib = {key: {name: results[name][attn][key] / 2**20 for name in MODELS} for key in ("peak", "step")}
        rows.append(Row(shape, attn, "train peak memory", "MiB", mib["peak"]["scratchgpt"], mib["peak"]["gpt2"],
                        mib["peak"]["scratchgpt"] / mib["peak"]["gpt2"],
                        samples={name: results[name][attn] for name in MODELS}))
        rows.append(Row(shape, attn, "  of which the step (acts+grads)", "MiB", mib["step"]["scratchgpt"],
                        mib["step"]["gpt2"], mib["step"]["scratchgpt"] / mib["step"]["gpt2"]))
    return rows


def generate_memory_child(which: str, shape: str, settings: Settings) -> int:
    """Run in a fresh process: one model of context 1,024; bytes above its resting size at the highest point of
    generating `decode_new` tokens after a 1,000-token prompt. `which`: "scratchgpt" (its `KVCache`),
    "dynamic-cache" (ScratchGPT given transformers' `DynamicCache`) or "gpt2" (GPT-2, a `DynamicCache`)."""
    attn = "sdpa" if "sdpa" in settings.attns else settings.attns[0]
    model = build_scratchgpt(shape, DECODE_CONTEXT_LENGTH, attn, settings).eval()
    if which == "gpt2":
        model = model.to_gpt2()
        model.set_attn_implementation(attn)
        gc.collect()
    cache = (lambda: {"cache": DynamicCache()}) if which == "dynamic-cache" else dict
    model.generate(**random_prompt(1, 8, settings), **generation_config(2), **cache())  # warm-up: first-use work
    gc.collect()
    resting = 1024 * _rss_kib("VmRSS")
    _reset_peak_rss()
    prompt = random_prompt(1, DECODE_CONTEXTS[1], settings)
    model.generate(**prompt, **generation_config(settings.decode_new), **cache())
    return 1024 * _rss_kib("VmHWM") - resting


def measure_generate_memory(shape: str, settings: Settings) -> list[Row]:
    """Peak memory of a long prompt's generation: ScratchGPT against GPT-2, and its `KVCache` against the
    `DynamicCache` transformers would give it."""
    names = ("scratchgpt", "gpt2", "dynamic-cache")
    runs = [in_child_processes(generate_memory_child, names, shape, settings) for _ in range(settings.memory_rounds)]
    samples = {name: [run[name] / 2**20 for run in runs] for name in names}
    mib = {name: median(samples[name]) for name in names}
    attn = "sdpa" if "sdpa" in settings.attns else settings.attns[0]
    measure = f"generate peak memory, {DECODE_CONTEXTS[1]:,} + {settings.decode_new}"
    return [
        Row(shape, attn, measure, "MiB", mib["scratchgpt"], mib["gpt2"], mib["scratchgpt"] / mib["gpt2"],
            samples={"dynamic_cache_mib": mib["dynamic-cache"], "mib": samples}),
        Row(shape, attn, "  KVCache / DynamicCache", "x", mib["scratchgpt"] / mib["dynamic-cache"], None),
    ]


# --- targets, table and JSON --------------------------------------------------------------------------------------


def target_for(row: Row, settings: Settings) -> Target | None:
    """The issues' goals for ScratchGPT; rows without one show no target. The bfloat16 speed goals are for CPUs
    with AMX, whose tiles multiply bfloat16 many times faster than float32."""
    if row.measure == "train tokens/s" and row.shape in ("small", "gpt2-small"):
        threshold = 1.10 if row.shape == "small" else 1.0
        return Target("ratio", ">=", threshold, f">= {threshold:.2f}x")
    cuda = settings.device.startswith("cuda")
    if row.measure == "train MFU" and row.shape == "gpt2-small" and not cuda:
        return Target("scratchgpt", ">=", 65.0, ">= 65%")
    if row.measure == "bf16 train MFU" and row.shape == "gpt2-small" and cuda and settings.peak_tflops:
        return Target("scratchgpt", ">=", 45.0, ">= 45%")  # of the datasheet's peak, as llm.c and nanoGPT count
    if row.measure == "generate tokens/s, batch 1":
        return Target("ratio", ">=", 1.2, ">= 1.20x")
    if row.measure.startswith("decode growth"):
        return Target("scratchgpt", "<=", 1.5, "<= 1.50x")
    if row.measure == "train peak memory" and row.shape == "gpt2-small":
        return Target("ratio", "<=", 0.8, "<= 0.80x")
    if row.measure == "decode step / weight-read limit" and row.shape == "gpt2-small":
        return Target("scratchgpt", "<=", 1.25, "<= 1.25x")
    if row.measure == "  KVCache / DynamicCache":  # one model's peak moves by up to 0.5% from process to process
        return Target("scratchgpt", "<=", 1.0, "<= 1.00x", tolerance=0.005)
    if row.measure.startswith("bf16 loss gap"):
        return Target("scratchgpt", "<=", 2.0, "<= 2.0%")
    if row.measure == "bf16 / fp32 train tokens/s" and row.shape == "gpt2-small" and settings.amx:
        return Target("scratchgpt", ">=", 1.5, ">= 1.50x")
    if row.measure == "bf16 / fp32 decode step" and row.shape == "gpt2-small" and settings.amx:
        return Target("scratchgpt", "<=", 0.6, "<= 0.60x")
    return None


def apply_targets(rows: list[Row], settings: Settings) -> None:
    for row in rows:
        target = target_for(row, settings)
        if target is not None:
            row.target, row.passed = target.label, target.check(row)


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "tok/s":
        return f"{value:,.0f}"
    if unit == "%":
        return f"{value:.1f}%" if value >= 1 else f"{value:.2f}%"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "MiB":
        return f"{value:,.0f} MiB"
    return f"{value:.2f} {unit}"


def print_table(rows: list[Row]) -> None:
    header = ("shape", "attn", "measure", "ScratchGPT", "GPT-2", "ratio", "target", "")
    lines = [header]
    for row in rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        verdict = "" if row.passed is None else ("PASS" if row.passed else "MISS")
        lines.append((row.shape, row.attn, row.measure, fmt(row.scratchgpt, row.unit), fmt(row.gpt2, row.unit),
                      ratio, row.target, verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {3, 4, 5}  # numbers line up on the right
    for i, line in enumerate(lines):
        cells = [cell.rjust(w) if j in right else cell.ljust(w) for j, (cell, w) in enumerate(zip(line, widths))]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")  # what the matmuls and bfloat16 can use


def cpu_description() -> dict:
    """The CPU's model, vendor and matrix / vector extensions, from /proc/cpuinfo (Linux), and the libraries that
    run torch's matmuls on it."""
    info = {"model": platform.processor() or platform.machine(), "vendor": "", "flags": []}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            fields = dict(line.split(":", 1) for line in cpuinfo.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        fields = {}
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    info["model"] = fields.get("model name", info["model"])
    info["vendor"] = fields.get("vendor_id", "")
    info["flags"] = [flag for flag in CPU_FLAGS if flag in fields.get("flags", "").split()]
    config = torch.__config__.show()
    for name, marker in (("mkl", "Math Kernel Library Version "), ("onednn", "MKL-DNN v")):
        info[name] = config.split(marker, 1)[1].split()[0].split("-")[0] if marker in config else None
    return info


def environment(settings: Settings) -> dict:
    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": cpu_description(),
        "threads": torch.get_num_threads(),
        "device": settings.device,
    }
    if settings.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def describe_machine(env: dict) -> str:
    """One line that says what every figure was measured on."""
    cpu = env["cpu"]
    flags = ", ".join(cpu["flags"]) or "no AVX2"
    device = env.get("gpu", "") + (" on " if "gpu" in env else "")
    return (f"{device}{cpu['model']} ({cpu['vendor'] or 'unknown vendor'}; {flags}), {env['threads']} threads,"
            f" torch {env['torch']}, MKL {cpu['mkl']}, oneDNN {cpu['onednn']}, transformers {env['transformers']}")


def print_notes(settings: Settings, rows: list[Row]) -> None:
    print()
    mfu = [row for row in rows if row.measure.endswith("train MFU")]
    if mfu:
        for measure, dtype in (("train MFU", settings.dtype), ("bf16 train MFU", "bfloat16")):
            matmul = ", ".join(f"{row.shape}/{row.attn} {row.samples['matmul_gflops']:,.0f}"
                               for row in rows if row.measure == measure)
            if matmul:
                print(f"matmul {settings.matmul_n}x{settings.matmul_n} {dtype}, GFLOP/s measured between the"
                      f" training runs: {matmul}")
        peak = f"--peak-tflops {settings.peak_tflops} for 16-bit rows, else " if settings.peak_tflops else ""
        n_params = ", ".join(dict.fromkeys(f"{row.shape} {row.samples['n_params']:,}" for row in mfu))
        print(f"MFU = (6 N + 12 n_layers emb_dim T) x tokens/s / peak, peak = {peak}the measured matmul of the row's"
              f" dtype; N = all parameters but the position embeddings, tied head once ({n_params})")
    if mfu:
        compiled = ", torch.compile'd" if settings.compile else ""
        print(f"train{compiled}: forward + backward + AdamW step, batch {settings.batch} x {settings.seq} tokens,"
              f" median of {settings.steps} steps per model after {settings.warmup} warm-up, alternating")
    if {"generate", "decode"} & set(settings.sections):
        print(f"generate: greedy, KV cache, {settings.gen_prompt}-token prompt + {settings.gen_new} new tokens,"
              f" whole call timed; decode: median gap between tokens of {settings.decode_new} after a 100 or"
              f" 1,000-token prompt, models of context {DECODE_CONTEXT_LENGTH}")
    if any(row.measure == "train peak memory" for row in rows):
        how = ("torch.cuda.max_memory_allocated" if settings.device.startswith("cuda") else
               "peak resident size (VmHWM, reset before the step) with malloc returning freed blocks to the system")
        print(f"memory: one fresh process per model; peak = {how}, minus the process before the model was built"
              " (so weights + AdamW state + the step's activations and gradients); generation: the median of"
              f" {settings.memory_rounds} such processes per model, above its resting size")
    for row in rows:
        if row.measure == "decode step / weight-read limit":
            print(f"weight-read limit, {row.shape}/{row.attn}: {row.samples['weight_mb']:.0f} MB of blocks and head at"
                  f" {row.samples['read_gb_s']:.1f} GB/s (torch.sum over 256 MiB; medians of the rounds, each round's"
                  f" step set against its own read) = {row.samples['limit_ms']:.2f} ms")
    if settings.bf16:
        no_amx = settings.device == "cpu" and not settings.amx
        print(f"bf16: training under torch.autocast(bfloat16) with float32 weights (Trainer's --bf16); decoding with"
              f" the weights cast to bfloat16; losses of {settings.bf16_loss_steps} steps from the same start"
              f"{'; no AMX here, so the bf16 speed targets do not apply' if no_amx else ''}")
    choices = decode_linear_choices()
    if choices:
        print("DecodeLinear, measured at first use (rows x out x in, dtype: way):",
              "; ".join(f"{key}: {way}" for key, way in choices.items()))
    same = [row.samples.get("same_tokens") for row in rows if "same_tokens" in row.samples]
    # the first training run of each shape: later ones start from weights that bf16 training moved apart
    losses = [row.samples["first_loss"] for row in rows
              if "first_loss" in row.samples and row.attn == settings.attns[0]]
    if losses and same:
        gap = max(abs(loss["scratchgpt"] - loss["gpt2"]) for loss in losses)
        print(f"checks: first training losses differ by at most {gap:.2e}; {100 * statistics.mean(same):.0f}% of the"
              " greedy tokens are the same (random weights: near-ties that rounding can flip)")


def decode_linear_choices() -> dict[str, str]:
    """Which way `DecodeLinear` measured fastest for each shape in this process: `F.linear`, the split `bmm` or
    ScratchGPT's kernel (its weights prefetched into the caches or non-temporally)."""
    from hf_scratchgpt.speedups_scratchgpt import DecodeLinear

    names = {"linear": "F.linear", "split": "split bmm", "kernel": "kernel", "kernel-nt": "kernel (non-temporal)"}
    return {f"{rows}x{out}x{inp} {str(dtype).removeprefix('torch.')}": names[way]
            for (rows, out, inp, dtype, _threads), way in DecodeLinear.fastest_way.items()}


# --- command line -------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> tuple[Settings, str | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape, few runs: under 2 minutes on 2 CPU cores")
    parser.add_argument(
        "--json", metavar="PATH", help="where to write all numbers and raw samples (default: benchmarks/results/)"
    )
    parser.add_argument("--shapes", help=f"comma-separated, of {', '.join(SHAPES)} (default: both; --quick: small)")
    parser.add_argument("--attn", default="eager,sdpa", help="attention implementations, comma-separated")
    parser.add_argument("--batch", type=int, help="training batch (default 4; --quick: 2)")
    parser.add_argument("--seq", type=int, help="training sequence length (default: the context)")
    parser.add_argument("--context", type=int, default=256, help="context_length of the models (default 256)")
    parser.add_argument("--steps", type=int, help="measured training steps per model (default 5; --quick: 3)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda when there is one")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile both models for training")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's 16-bit peak, for the MFU of bf16 rows instead of the measured matmul")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the memory measurements")
    parser.add_argument("--only", help=f"comma-separated parts to measure, of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                        help="bfloat16 rows (default: where the CPU has AVX-512 BF16 or AMX, or on CUDA)")
    args = parser.parse_args(argv)

    shapes = (args.shapes or ("small" if args.quick else "small,gpt2-small")).split(",")
    unknown = [shape for shape in shapes if shape not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    sections = tuple(args.only.split(",")) if args.only else SECTIONS
    unknown = [section for section in sections if section not in SECTIONS]
    if unknown:
        parser.error(f"unknown part(s) {unknown} for --only; choose from {', '.join(SECTIONS)}")
    settings = Settings(shapes=shapes, attns=args.attn.split(","), device=args.device, dtype=args.dtype,
                        context=args.context, compile=args.compile, peak_tflops=args.peak_tflops,
                        skip_memory=args.skip_memory, sections=sections)
    flags = cpu_description()["flags"]
    settings.amx = settings.device == "cpu" and "amx_bf16" in flags
    bf16_hardware = settings.device.startswith("cuda") or "amx_bf16" in flags or "avx512_bf16" in flags
    settings.bf16 = (bf16_hardware if args.bf16 is None else args.bf16) and settings.dtype == "float32"
    if "bf16-train" in sections and args.only and not settings.bf16:
        parser.error("--only bf16-train, but the bfloat16 rows are off (no AVX-512 BF16 or AMX here, --no-bf16, or"
                     " --dtype other than float32); add --bf16 to measure them anyway")
    if settings.device.startswith("cuda"):
        settings.matmul_n = 8192  # a GPU's peak needs a large product (2,048 is done in microseconds)
    if args.quick:
        settings.batch, settings.steps, settings.warmup = 2, 3, 1
        settings.gen_new, settings.decode_new, settings.decode_rounds, settings.matmul_reps = 16, 12, 2, 2
        settings.memory_rounds = 1
        settings.bf16_loss_steps = 10
    settings.batch = args.batch or settings.batch
    settings.steps = args.steps or settings.steps
    settings.seq = args.seq or settings.context
    if settings.seq > settings.context:
        parser.error(f"--seq {settings.seq} is longer than --context {settings.context}")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    return settings, args.json


def main(argv=None) -> None:
    settings, json_path = parse_args(argv)
    start = time.perf_counter()
    env = environment(settings)
    print(f"ScratchGPT vs GPT2LMHeadModel on {env['device']}, {settings.dtype}: {describe_machine(env)}", flush=True)

    rows: list[Row] = []
    sections = settings.sections
    for shape in settings.shapes:
        pair = build_pair(shape, settings.context, settings.attns[0], settings)
        for attn in settings.attns:
            set_attn(pair, attn)
            training = measure_training(pair, shape, attn, settings) if "train" in sections else []
            rows += training
            if settings.bf16 and "bf16-train" in sections:
                rows += measure_bf16_training(pair, shape, attn, training, settings)
            if "generate" in sections:
                rows += [measure_generation(pair, shape, attn, batch, settings) for batch in settings.gen_batches]
            print(f"  [{time.perf_counter() - start:5.0f}s] {shape} {attn}: training and generation done", flush=True)
        if "decode" in sections:
            if settings.context < DECODE_CONTEXT_LENGTH:
                del pair
                gc.collect()
                pair = build_pair(shape, DECODE_CONTEXT_LENGTH, settings.attns[0], settings)
            for attn in settings.attns:
                set_attn(pair, attn)
                rows += measure_decode(pair, shape, attn, settings)
                if settings.bf16:
                    rows += measure_bf16_decode(pair, shape, attn, settings)
            print(f"  [{time.perf_counter() - start:5.0f}s] {shape}: decode done", flush=True)
        del pair
        gc.collect()
        if settings.bf16 and "bf16-train" in sections:
            rows.append(measure_bf16_loss(shape, settings.attns[0], settings))
            print(f"  [{time.perf_counter() - start:5.0f}s] {shape}: bf16 losses done", flush=True)
        if "memory" in sections and not settings.skip_memory:
            rows += measure_memory(shape, settings)
            rows += measure_generate_memory(shape, settings)
            print(f"  [{time.perf_counter() - start:5.0f}s] {shape}: memory done", flush=True)

    order = [measure for measure in dict.fromkeys(row.measure for row in rows)]
    rows.sort(key=lambda row: (settings.shapes.index(row.shape), settings.attns.index(row.attn),
                               order.index(row.measure)))
    apply_targets(rows, settings)
    print()
    print_table(rows)
    print_notes(settings, rows)
    elapsed = time.perf_counter() - start
    print(f"\n{elapsed:.0f} s in all")
    if json_path is None:
        json_path = Path(__file__).parent / "results" / time.strftime("bench-%Y%m%d-%H%M%S.json")
        json_path.parent.mkdir(exist_ok=True)
    report = {"environment": env, "settings": asdict(settings), "seconds": elapsed,
              "decode_linear_ways": decode_linear_choices(), "rows": [asdict(row) for row in rows]}
    with open(json_path, "w") as out:
        json.dump(report, out, indent=2)
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
