"""Chapter 5 and appendix D, training with `Trainer`: the pieces the book's training loop had that `Trainer` lacks.

- `SampleGenerationCallback`: the book's `generate_and_print_sample`, a greedy continuation of a fixed prompt at
  each evaluation, to watch the model learn.
- `LossPlotCallback`: the book's loss plot, training and validation loss against tokens seen, as a PNG.
- `ScratchGPTTrainer`: `Trainer` that logs perplexity next to the validation loss of a language model (a loss
  evaluated without the logits, chunk by chunk as in training) and writes this project's model card (Hub
  metadata, training setup, final metrics) when the run is saved or pushed.
"""

import json
import math
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from .app import write_space_app
from .modeling_scratchgpt import ScratchGPTForCausalLM
from .speedups_scratchgpt import chunked_causal_lm_loss


class SampleGenerationCallback(TrainerCallback):
    """Print a greedy continuation of `prompt` after each evaluation (the book's `generate_and_print_sample`).

    Every process generates (a model sharded by FSDP needs all of them for a forward pass); the first prints.
    """

    def __init__(self, tokenizer, prompt: str = "Every effort moves you", max_new_tokens: int = 50):
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        text = generate_sample(model, self.tokenizer, self.prompt, self.max_new_tokens)
        if state.is_world_process_zero:
            print(f"\n[step {state.global_step}] {text!r}")


@torch.no_grad()
def generate_sample(model, tokenizer, prompt: str, max_new_tokens: int = 50) -> str:
    """Greedy continuation of `prompt`, prompt included, cut to fit the model's context."""
    was_training = model.training
    model.eval()
    room = model.config.context_length - max_new_tokens
    ids = tokenizer(prompt, return_tensors="pt").input_ids[:, -max(room, 1) :].to(model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=min(max_new_tokens, model.config.context_length - ids.shape[1]),
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=False)


class LossPlotCallback(TrainerCallback):
    """Plot training and validation loss against tokens seen (the book's `plot_losses`) into `output_dir/loss.png`.

    Redrawn at every evaluation, so a run that stops early still leaves its curve behind.
    """

    def __init__(self, filename: str = "loss.png"):
        self.filename = filename

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_losses(state.log_history, Path(args.output_dir) / self.filename)

    on_train_end = on_evaluate


def plot_losses(log_history: list[dict], path: str | os.PathLike) -> Path | None:
    """Training and validation loss from a `Trainer`'s log history, against tokens seen (or steps)."""
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    x_key = "num_input_tokens_seen" if any("num_input_tokens_seen" in e for e in log_history) else "step"
    curves = {
        "training loss": [(e[x_key], e["loss"]) for e in log_history if "loss" in e and x_key in e],
        "validation loss": [(e[x_key], e["eval_loss"]) for e in log_history if "eval_loss" in e and x_key in e],
    }
    if not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        if points:
            ax.plot(*zip(*points), label=label, linestyle="-" if label.startswith("training") else "-.")
    ax.set_xlabel("tokens seen" if x_key == "num_input_tokens_seen" else "step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class ScratchGPTTrainer(Trainer):
    """`Trainer` with perplexity in the evaluation logs of a language model, and this project's model card.

    Args:
        card: what the model card says beyond what the trainer knows: `datasets` (Hub ids or names), `license`,
            `tags`, `description` (a paragraph of Markdown), `base_model`.
        log_perplexity: add `eval_perplexity = exp(eval_loss)` (for language models only).
    """

    def __init__(self, *args, card: dict | None = None, log_perplexity: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.card = card or {}
        self.log_perplexity = log_perplexity

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss-only evaluation of a ScratchGPT language model takes the chunked loss of training, so it never holds
        the (batch, tokens, vocabulary) logits: 412 MB at 16 x 128 tokens and GPT-2's vocabulary."""
        lm = self.accelerator.unwrap_model(model)
        if not (
            prediction_loss_only
            and isinstance(lm, ScratchGPTForCausalLM)
            and lm.config.loss_chunk_size > 0
            and inputs.get("labels") is not None
            and self.label_smoother is None  # Trainer's own path smooths the labels
        ):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        model_inputs = {"use_cache": False, **{key: value for key, value in inputs.items() if key != "labels"}}
        with torch.no_grad(), self.autocast_smart_context_manager():
            hidden_states = lm.model(**model_inputs).last_hidden_state
            loss = chunked_causal_lm_loss(hidden_states, lm.lm_head.weight, inputs["labels"], lm.config.loss_chunk_size)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.log_perplexity and "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))  # exp(50) already says "untrained"
        super().log(logs, start_time)

    def create_model_card(self, **kwargs) -> None:
        if self.is_world_process_zero():
            write_model_card(self.args.output_dir, self.model, self.args, self.state.log_history, **self.card)


def write_model_card(
    output_dir,
    model,
    args,
    log_history: list[dict],
    *,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    tags: list[str] | None = None,
    description: str = "",
    base_model: str | None = None,
    pipeline_tag: str = "text-generation",
    space_app: bool = False,
) -> Path:
    """Write `output_dir/README.md`: the Hub's YAML metadata, how to load the model, its setup and final metrics.

    With `space_app`, the folder is also a Hugging Face Space (`hf_scratchgpt.app.write_space_app`): `app.py`, its
    requirements, the Space's settings in the card's metadata and a section on trying the model.
    """
    config = model.config
    metadata = {
        "library_name": "transformers",
        "license": license,
        "pipeline_tag": pipeline_tag,
        "tags": ["scratchgpt", "gpt2", "from-scratch", "custom_code", *(tags or [])],
    }
    if datasets:
        metadata["datasets"] = list(datasets)
    if base_model:
        metadata["base_model"] = base_model
    final = {}
    for entry in log_history:  # the last value of each metric
        kept = {k: v for k, v in entry.items() if k.startswith(("eval_", "train_", "test_", "base_")) or k == "loss"}
        final.update(kept)
    n_params = sum(p.numel() for p in model.parameters())
    auto_class = "AutoModelForSequenceClassification" if pipeline_tag == "text-classification" else "AutoModelForCausalLM"
    setup = {
        "parameters": f"{n_params:,}",
        "layers / heads / width / context": f"{config.n_layers} / {config.n_heads} / {config.emb_dim} / "
        f"{config.context_length}",
        "vocabulary": config.vocab_size,
        "learning rate, schedule, warm-up steps": f"{args.learning_rate}, {args.lr_scheduler_type}, "
        f"{args.warmup_steps}",
        "weight decay / gradient clipping": f"{args.weight_decay} / {args.max_grad_norm}",
        "batch per device x accumulation": f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps}",
        "epochs / max steps": f"{args.num_train_epochs} / {args.max_steps}",
        "precision": "bf16" if args.bf16 else "fp32",
        "seed": args.seed,
    }
    lines = ["---", *_yaml_lines(metadata), "---", "", f"# {Path(output_dir).name}", ""]
    lines += [
        description or "A ScratchGPT model: the GPT of *Build a Large Language Model (From Scratch)*, trained with "
        "the `hf_scratchgpt` recipes.",
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import {auto_class}, AutoTokenizer",
        "",
        f'model = {auto_class}.from_pretrained("{args.hub_model_id or output_dir}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{args.hub_model_id or output_dir}")',
        "```",
        "",
        *(_space_section() if space_app else []),
        "## Training setup",
        "",
        "| setting | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in setup.items()],
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(final.items())],
        "",
    ]
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    if space_app:
        write_space_app(output_dir)
    return path


def _space_section() -> list[str]:
    return [
        "## Try it",
        "",
        "`app.py` is the model's web page (Gradio): `pip install -r requirements.txt && python app.py` in this folder. "
        "The folder is also a Hugging Face Space: `hf upload YOU/NAME . --repo-type space` runs the page there.",
        "",
    ]


def _yaml_lines(metadata: dict) -> list[str]:
    lines = []
    for key, value in metadata.items():
        if isinstance(value, list):
            lines += [f"{key}:", *[f"- {json.dumps(item)}" for item in value]]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return lines


__all__ = [
    "SampleGenerationCallback",
    "LossPlotCallback",
    "ScratchGPTTrainer",
    "generate_sample",
    "plot_losses",
    "write_model_card",
]
