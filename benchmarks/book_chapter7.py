"""Benchmark of chapter 7, instruction fine-tuning: the default pretraining run, then recipes/instruct.py on the
book's data, offline on a CPU; and the speed of `--packing`.

    python benchmarks/book_chapter7.py [--data ../shared/data] [--base runs/pretrain-default]

1. The main job, `python recipes/pretrain.py` (skipped when `--base` already holds a model).
2. The untuned base answers the 110 test instructions: ROUGE-L, exact match and stop rate of the base.
3. `recipes/instruct.py --config recipes/configs/instruct/cpu.yaml` tunes it; the same measures, tuned.
4. Packing: useful (non-padding) tokens per second of training steps with and without `--packing`, the same
   examples in each step, alternating the two step by step in one process.
Targets: the tuned model ends at least 90% of its answers by itself; its ROUGE-L is at least twice the base's;
packing gives at least 1.15x the useful tokens per second. The book's own run (GPT-2 medium) needs its weights
and a GPU: the command is printed at the end.
"""

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hf_scratchgpt.data.instruction import (
    InstructionCollator,
    add_chat_template,
    instruction_splits,
    load_instruction_data,
    tokenize_instructions,
)
from hf_scratchgpt.responses import answer_instructions, score_responses
from hf_scratchgpt.tokenization import gpt2_tokenizer_from_dir

ROOT = Path(__file__).resolve().parents[1]
BOOK_COMMAND = (
    "python recipes/instruct.py --config recipes/configs/instruct/book_chapter7.yaml "
    "--train_file ../shared/data/instruction/instruction-data.json"
)
BOOK = {"validation loss after tuning": 0.657, "judge score (Llama 3 8B)": 49.45}


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder with instruction/")
    parser.add_argument("--base", default=str(ROOT / "runs" / "pretrain-default"), help="the pretrained model")
    parser.add_argument("--output_dir", default=str(ROOT / "runs" / "book-chapter7"))
    parser.add_argument("--packing_steps", type=int, default=10, help="training steps per packing measurement")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args()
    data_file = Path(args.data) / "instruction" / "instruction-data.json"

    start = time.perf_counter()
    if not (Path(args.base) / "config.json").exists():
        load_recipe("pretrain").main(["--output_dir", args.base, "--tensorboard", "false"])
    pretrain_minutes = (time.perf_counter() - start) / 60

    model = AutoModelForCausalLM.from_pretrained(args.base)
    tokenizer = add_chat_template(gpt2_tokenizer_from_dir(args.base))
    test = list(instruction_splits(load_instruction_data(data_file))["test"])
    base = score_responses(answer_instructions(model, tokenizer, test, max_new_tokens=100, batch_size=32))

    start = time.perf_counter()
    tuned = load_recipe("instruct").main([
        "--config", str(ROOT / "recipes" / "configs" / "instruct" / "cpu.yaml"),
        "--model_name_or_path", args.base, "--train_file", str(data_file), "--output_dir", args.output_dir,
        "--overwrite_output_dir", "true", "--tensorboard", "false", "--disable_tqdm", "true",
    ])
    tune_minutes = (time.perf_counter() - start) / 60
    packed, unpacked = packing_throughput(args.base, data_file, args.packing_steps)

    rows = [
        ("validation loss", tuned.get("base_loss"), tuned.get("eval_loss"), "", ""),
        ("ROUGE-L", base["rouge_l"], tuned["test_rouge_l"], ">= 2x base", tuned["test_rouge_l"] >= 2 * base["rouge_l"]),
        ("exact match", base["exact_match"], tuned["test_exact_match"], "", ""),
        ("stop rate", base["stop_rate"], tuned["test_stop_rate"], ">= 0.90", tuned["test_stop_rate"] >= 0.9),
        ("mean answer words", base["mean_response_words"], tuned["test_mean_response_words"], "", ""),
    ]
    print(f"\nThe book's chapter 7 on a CPU: pretraining {pretrain_minutes:.1f} min (0 if reused), tuning and "
          f"answering {tune_minutes:.1f} min\n")
    print("| measure | base | tuned | target | result |\n| --- | ---: | ---: | --- | --- |")
    for name, before, after, target, passed in rows:
        result = "" if target == "" else "PASS" if passed else "MISS"
        print(f"| {name} | {before:.3f} | {after:.3f} | {target} | {result} |")
    ratio = packed / unpacked
    print(f"\n| packing | useful tokens/s |\n| --- | ---: |\n| without | {unpacked:,.0f} |\n| with | {packed:,.0f} |"
          f"\n| ratio | {ratio:.2f}x (target >= 1.15x: {'PASS' if ratio >= 1.15 else 'MISS'}) |")
    print(f"\nThe book's run (GPT-2 medium; book: validation loss {BOOK['validation loss after tuning']}, judge "
          f"{BOOK['judge score (Llama 3 8B)']}):\n  {BOOK_COMMAND}")
    if args.json:
        results = dict(base=base, tuned=tuned, packing=dict(packed=packed, unpacked=unpacked),
                       minutes=dict(pretrain=pretrain_minutes, tune=tune_minutes))
        Path(args.json).write_text(json.dumps(results, indent=2))


def packing_throughput(base: str, data_file: Path, steps: int, batch_size: int = 16, rounds: int = 3):
    """Useful tokens per second of training steps over the same examples, packed and not.

    The two alternate step by step (in turn first), after a warm-up step of each, so that a machine whose speed
    drifts slows both alike; each figure is the useful tokens of all steps over the summed time of its steps.
    """
    model = AutoModelForCausalLM.from_pretrained(base).train()
    tokenizer = gpt2_tokenizer_from_dir(base)
    train = instruction_splits(load_instruction_data(data_file))["train"]
    features, _ = tokenize_instructions(train, tokenizer, max_length=model.config.context_length)
    batches = [[features[i] for i in range(s * batch_size, (s + 1) * batch_size)] for s in range(steps)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    collators = {packing: InstructionCollator(tokenizer.pad_token_id, packing=packing) for packing in (False, True)}
    seconds = {False: 0.0, True: 0.0}
    for round_ in range(rounds):
        for step, examples in enumerate(batches):
            for packing in (False, True) if (step + round_) % 2 == 0 else (True, False):
                start = time.perf_counter()
                model(**collators[packing](examples)).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if round_ > 0 or step > 0:  # the first step of each warms up
                    seconds[packing] += time.perf_counter() - start
    useful = sum(len(example["input_ids"]) for examples in batches for example in examples) * rounds
    useful -= sum(len(example["input_ids"]) for example in batches[0])  # the warm-up step
    return useful / seconds[True], useful / seconds[False]


if __name__ == "__main__":
    main()
