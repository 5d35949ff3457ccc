"""Chapter 5, generating text (section 5.3): sample from a saved model, streaming to the terminal.

    scratchgpt-generate runs/pretrain-default --prompt "The for statement" --max_new_tokens 80 \\
        --temperature 0.8 --top_k 40 --top_p 0.95 [--dtype bfloat16]
    python -m hf_scratchgpt.generate FOLDER_OR_HUB_ID ...

Temperature 0 is greedy decoding; otherwise tokens are sampled after temperature scaling, top-k and top-p
filtering, as the book's `generate` does (top-p is transformers' addition).
"""

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

from .app import sampling_kwargs
from .hub import check_model_folder


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scratchgpt-generate", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model folder or a Hub id")
    parser.add_argument("--prompt", default="Every effort moves you", help="text to continue")
    add_sampling_arguments(parser)
    parser.add_argument("--trust_remote_code", action="store_true", help="load a folder's own code")
    args = parser.parse_args(argv)
    if not args.prompt:
        parser.error("--prompt is empty: give the text to continue")
    check_sampling_arguments(parser, args)
    return args


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 50) -> None:
    """The flags of sampling, and the weights' dtype, shared by `scratchgpt-generate` and `scratchgpt-chat`."""
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--top_p", type=float, default=1.0, help="sample among the likeliest tokens of mass p")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "auto"],
        help="the weights' dtype: bfloat16 halves the bytes a decoding step reads (auto: as saved)",
    )


def check_sampling_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A bad sampling flag is a one-line usage error (exit status 2)."""
    if args.max_new_tokens <= 0:
        parser.error(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        parser.error(f"--top_k must be >= 0, got {args.top_k}")


def main(argv=None) -> None:
    """The `scratchgpt-generate` command: exit status 0 after streaming the text (a console script exits with
    whatever `main` returns, so it returns nothing)."""
    generate_text(argv)


def generate_text(argv=None) -> str:
    """Parse `argv`, load the model, stream its continuation of the prompt and return the whole text."""
    args = parse_args(argv)
    import hf_scratchgpt  # noqa: F401  registers ScratchGPT with the Auto classes

    check_model_folder("scratchgpt-generate", args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code
        ).eval()
    except (OSError, ValueError) as err:  # ValueError: a folder without a tokenizer, a config transformers refuses
        sys.exit(f"scratchgpt-generate: error: cannot load {args.model}: {str(err).strip().splitlines()[0]}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    room = model.config.max_position_embeddings - ids.shape[1]
    if room <= 0:
        sys.exit(f"scratchgpt-generate: error: the prompt has {ids.shape[1]} tokens, the model's context holds "
                 f"{model.config.max_position_embeddings}")
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=min(args.max_new_tokens, room),
        streamer=TextStreamer(tokenizer),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **sampling_kwargs(args.temperature, args.top_k, args.top_p),
    )
    return tokenizer.decode(out[0])


if __name__ == "__main__":
    main()
