"""Chapter 7, serving the fine-tuned model: export a saved ScratchGPT as a transformers GPT-2 folder.

    scratchgpt-export runs/instruct-default runs/instruct-gpt2 --to gpt2 [--overwrite]
    python -m hf_scratchgpt.export FOLDER OUT --to gpt2
    transformers serve runs/instruct-gpt2 --host 127.0.0.1 --port 8000

`transformers serve` (an OpenAI-compatible server: `/v1/completions`, `/v1/chat/completions`) builds the class named
in `config.architectures[0]` from the `transformers` namespace, so it cannot load a ScratchGPT folder, not even with
`--trust-remote-code`. ScratchGPT computes exactly what GPT-2 computes, so the export writes the same weights as a
`GPT2LMHeadModel` (safetensors), with the tokenizer (and its chat template), the generation config and a README
beside them; then it loads the written folder back and checks that its logits are the ScratchGPT's.

What GPT-2 cannot express is refused with one line: a folder that is not a ScratchGPT language model (another
`model_type`, a chapter 6 classifier, a bare backbone) and a config field the export does not know. Each field
ScratchGPT has today is accounted for in `_HOW_GPT2_EXPRESSES`.
"""

import argparse
import copy
import json
import os
import shlex
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, PreTrainedConfig
from transformers.utils.import_utils import is_serve_available


# Each ScratchGPTConfig field, and what becomes of it in GPT2Config (conversion.config_to_gpt2). A field not listed
# here is refused: a new field may change the math, and GPT-2 then has to be taught it first.
_HOW_GPT2_EXPRESSES = {
    "vocab_size": "vocab_size",
    "context_length": "n_positions",
    "emb_dim": "n_embd",
    "n_heads": "n_head",
    "n_layers": "n_layer",
    "layer_norm_eps": "layer_norm_epsilon",
    "qkv_bias": "False is a zero c_attn bias: the same function",
    "tie_word_embeddings": "tie_word_embeddings (untied: GPT-2 keeps lm_head.weight as its own matrix)",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "use_cache": "use_cache",
    "drop_rate": "resid/embd/attn_pdrop (dropout: no effect on inference)",
    "initializer_range": "initializer_range (initialisation only)",
    "init_scheme": "dropped (initialisation only)",
    "loss_chunk_size": "dropped (the training loss only)",
    "auto_map": "dropped (GPT-2 is in transformers itself)",
}
EXPORT_FORMATS = ("gpt2",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
_CHECK_TOKENS = 8  # length of the input on which the exported logits are compared with the ScratchGPT's


def export_to_gpt2(folder: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the ScratchGPT causal LM saved in `folder` to `out` as a transformers GPT-2 and return `out`.

    `out` gets `model.safetensors` and `config.json` (a `GPT2LMHeadModel`), `generation_config.json` (the source's,
    with the tokenizer's padding token where it had none), the tokenizer files (`chat_template.jinja` when the
    tokenizer has a chat template) and a README. The written folder is loaded back and its logits on a short input
    compared with the ScratchGPT's; a difference beyond rounding is a ValueError. A non-empty `out` is refused unless
    `overwrite` (files of the same name are replaced, others left). Raises ValueError or OSError with one line.
    """
    import hf_scratchgpt  # noqa: F401  registers ScratchGPT with the Auto classes

    source, out = Path(folder).expanduser(), Path(out).expanduser()
    config = _check_source(source)
    _check_out(source, out, overwrite)
    tokenizer = _load_tokenizer(source, config["vocab_size"])

    model = AutoModelForCausalLM.from_pretrained(source).eval()
    gpt2 = model.to_gpt2()
    gpt2.generation_config = _generation_config(model, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    gpt2.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    del gpt2

    difference = _check_logits(model, out)
    _write_readme(out, source, model.config, tokenizer, difference)
    return out


def _check_source(source: Path) -> dict:
    """The source's config.json, once it is known to be a ScratchGPT language model that GPT-2 can express."""
    if not source.is_dir():
        raise FileNotFoundError(f"no model folder {source}")
    config_file = source / "config.json"
    if not config_file.is_file():
        if (source / "adapter_config.json").is_file():
            raise ValueError(f"{source} holds a PEFT adapter, not a model: merge it into its base model first")
        raise ValueError(f"{source} has no config.json: not a saved model")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type == "gpt2":
        raise ValueError(f"{source} is already a GPT-2 model (model_type gpt2): serve it as it is")
    if model_type != "scratchgpt":
        raise ValueError(f"{source} is a {model_type or 'untyped'} model, not ScratchGPT: only ScratchGPT exports")
    architectures = config.get("architectures") or []
    if "ScratchGPTForCausalLM" not in architectures:
        named = ", ".join(architectures) or "no architecture"
        raise ValueError(
            f"{source} holds {named}, not ScratchGPTForCausalLM: only a language model (with its LM head) "
            "exports to GPT-2 for text generation"
        )
    unknown = sorted(set(config) - set(PreTrainedConfig().to_dict()) - set(_HOW_GPT2_EXPRESSES))
    if unknown:
        raise ValueError(f"{source}'s config has fields the GPT-2 export does not know: {', '.join(unknown)}")
    return config


def _check_out(source: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: give a folder to export to")
    if out.exists() and out.resolve() == source.resolve():
        raise ValueError(f"{out} is the source folder itself: choose another folder to export to")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite (overwrite=True) or choose another")


def _load_tokenizer(source: Path, vocab_size: int):
    if not any((source / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"{source} has no tokenizer: save the model's tokenizer beside it (tokenizer.save_pretrained)")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{source}'s tokenizer has {len(tokenizer)} tokens, more than the model's {vocab_size}")
    return tokenizer


def _generation_config(model, tokenizer):
    """The source's generation config (eos, bos, pad, and any sampling defaults), padding with the tokenizer's pad."""
    generation_config = copy.deepcopy(model.generation_config)
    if generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return generation_config


@torch.no_grad()
def _check_logits(model, out: Path) -> float:
    """Load `out` back as GPT-2 and compare its logits with `model`'s on a few tokens; the largest difference."""
    exported = GPT2LMHeadModel.from_pretrained(out).eval()
    generator = torch.Generator().manual_seed(0)
    n = min(_CHECK_TOKENS, model.config.context_length)
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=generator)
    ours, theirs = model(ids).logits.float(), exported(ids).logits.float()  # (1, n, vocab)
    difference = (ours - theirs).abs().max().item()
    # A wrong weight moves the logits by their own size; rounding by a few units of the dtype's precision.
    tolerance = (1e-4 if model.dtype == torch.float32 else 5e-2) * max(1.0, ours.abs().max().item())
    if difference > tolerance:
        raise ValueError(
            f"the GPT-2 written to {out} does not compute the ScratchGPT's logits (largest difference "
            f"{difference:.3g}, allowed {tolerance:.3g}): do not use it"
        )
    return difference


def serve_command(out: str | os.PathLike, port: int = 8000) -> str:
    """The shell command that serves an exported folder; requests then name the same absolute path as `model`."""
    return f"transformers serve {shlex.quote(str(Path(out).expanduser().resolve()))} --host 127.0.0.1 --port {port}"


def _write_readme(out: Path, source: Path, config, tokenizer, difference: float) -> None:
    chat = tokenizer.chat_template is not None
    path = str(out.resolve())
    lines = [
        f"# {out.name}",
        "",
        f"A ScratchGPT language model (from `{source}`) exported as a transformers GPT-2 (`GPT2LMHeadModel`) by "
        "`scratchgpt-export --to gpt2`: the same weights under GPT-2's names, so that it loads without "
        "hf_scratchgpt or `trust_remote_code`, and `transformers serve` can serve it.",
        "",
        f"- {config.n_layers} layers, {config.n_heads} heads, width {config.emb_dim}, context {config.context_length} "
        f"tokens, vocabulary {config.vocab_size}; {'tied' if config.tie_word_embeddings else 'untied'} embeddings.",
        f"- Logits checked against the ScratchGPT on {min(_CHECK_TOKENS, config.context_length)} tokens: "
        f"largest difference {difference:.2g}.",
        f"- Tokenizer {'with' if chat else 'without'} a chat template: "
        + ("`/v1/chat/completions` formats messages with it." if chat else "use `/v1/completions` (chat needs one)."),
        "",
        "## Serve",
        "",
        "```bash",
        'pip install "transformers[serving]"',
        serve_command(out),
        "curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\",
        f"  -d '{{\"model\": \"{path}\", \"prompt\": \"Every effort moves you\", \"max_tokens\": 50}}'",
        "```",
        "",
        f"Always send `max_tokens`: the server otherwise asks for 1,024 new tokens, and prompt plus answer must fit "
        f"the {config.context_length}-token context (GPT-2's learned positions end there).",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scratchgpt-export", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a saved ScratchGPT language model (with its tokenizer)")
    parser.add_argument("out", help="the folder to write the export to (new or empty)")
    parser.add_argument("--to", required=True, choices=EXPORT_FORMATS, help="the format to export to")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    """The `scratchgpt-export` command: exit status 0 after the export, 2 with one line on stderr when refused."""
    args = parse_args(argv)
    try:
        out = export_to_gpt2(args.folder, args.out, overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        if os.environ.get("HF_SCRATCHGPT_TRACEBACK") == "1":
            raise
        lines = str(err).strip().splitlines() or [type(err).__name__]
        print(f"scratchgpt-export: error: {lines[0]}", file=sys.stderr)
        sys.exit(2)
    print(f"saved {args.folder} as GPT-2 to {out}")
    if not is_serve_available():
        print('transformers serve needs: pip install "transformers[serving]"')
    print(f"serve it with: {serve_command(out)}")
    print(f'then POST /v1/completions or /v1/chat/completions with "model": "{out.resolve()}" and "max_tokens"')


if __name__ == "__main__":
    main()
