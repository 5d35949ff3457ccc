"""Chapter 5, pretraining: train ScratchGPT from scratch with transformers' `Trainer`.

    python recipes/pretrain.py                                        # the embedded corpus, minutes on a CPU
    python recipes/pretrain.py --config recipes/configs/pretrain/book_chapter5.yaml \\
        --train_file the-verdict.txt --tokenizer path/to/gpt2/files   # the book's run
    torchrun --nproc_per_node 2 recipes/pretrain.py ...               # several processes (DDP)
    torchrun --nnodes 2 --node_rank 0 ... recipes/pretrain.py ...     # several machines (one command on each)
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/pretrain.py ...

Settings come from `--config FILE.yaml` (default: recipes/configs/pretrain/default.yaml) and flags, which win.
The run: corpus -> tokenizer (trained on the corpus, or GPT-2's) -> token ids on disk (made once, reused by every
process and by later runs) -> sliding windows -> train (resumable from its checkpoints) -> save model, tokenizer,
code and model card -> loss plot -> a sample generation. With --streaming, windows are cut as the corpus is read.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from datasets import IterableDataset
from torch.utils.data import Subset
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM
from hf_scratchgpt.data import CorpusPart, corpus_parts, default_corpus, pretraining_windows
from hf_scratchgpt.recipe import check_enough_data, check_vocabulary, finish_recipe, run_recipe, start_recipe
from hf_scratchgpt.tokenization import gpt2_tokenizer_from_dir, train_bpe_tokenizer
from hf_scratchgpt.training import LossPlotCallback, SampleGenerationCallback, ScratchGPTTrainer, generate_sample

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "pretrain" / "default.yaml"
# What a new model is built with, and a model loaded to continue already has: given with --model_name_or_path,
# each is an error. (`drop_rate` is not among them: a loaded model trains with any dropout.)
NEW_MODEL_SETTINGS = (
    "preset", "context_length", "emb_dim", "n_layers", "n_heads", "qkv_bias", "tie_word_embeddings", "init_scheme",
    "vocab_size",
)


@dataclass
class ModelArguments:
    PATHS: ClassVar[dict] = {"model_name_or_path": "hub"}  # checked before any work

    preset: str | None = field(
        default=None, metadata={"help": "Named shape (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl, tiny)."}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Continue from a saved ScratchGPT (folder or Hub id) instead of a new model."},
    )
    context_length: int | None = field(default=None, metadata={"help": "Tokens per window and model context."})
    emb_dim: int | None = field(default=None, metadata={"help": "Model width."})
    n_layers: int | None = field(default=None, metadata={"help": "Transformer blocks."})
    n_heads: int | None = field(default=None, metadata={"help": "Attention heads."})
    drop_rate: float | None = field(default=None, metadata={"help": "Dropout rate."})
    qkv_bias: bool | None = field(default=None, metadata={"help": "Bias on the query/key/value projection."})
    tie_word_embeddings: bool | None = field(default=None, metadata={"help": "Share embedding and output head."})
    init_scheme: str | None = field(default=None, metadata={"help": "gpt2 (GPT-2's init) or book (PyTorch's)."})


@dataclass
class DataArguments:
    PATHS: ClassVar[dict] = {"train_file": "local", "tokenizer": "hub"}

    train_file: list[str] | None = field(
        default=None,
        metadata={"help": "Text file(s) or folder of .txt files; default: the embedded corpus."},
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset id instead of files."})
    dataset_split: str = field(default="train", metadata={"help": "Split of --dataset_name to read."})
    text_column: str = field(default="text", metadata={"help": "Column of --dataset_name holding the text."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Share of the corpus held out (book: 0.1)."})
    split_by: str = field(default="characters", metadata={"help": "characters (the book's cut) or documents."})
    stride: int | None = field(default=None, metadata={"help": "Tokens between window starts; default: context."})
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "bpe: train one on the corpus (the default for a new model); else a folder with GPT-2's "
                  "encoder.json + vocab.bpe, a saved tokenizer, or a Hub id. Default when continuing: the model's."},
    )
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of a BPE tokenizer trained here."})
    validation_split: str | None = field(
        default=None,
        metadata={"help": "Split of --dataset_name to validate on, instead of holding out --validation_fraction."},
    )
    num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenizing."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Cut windows while the corpus is read, storing nothing; the run is --max_steps long."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N validation windows only (default: all)."}
    )
    data_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the token ids on disk (default: datasets' cache); shared by all machines."},
    )
    sample_prompt: str = field(default="Every effort moves you", metadata={"help": "Prompt of the sample text."})
    sample_max_new_tokens: int = field(default=50, metadata={"help": "Tokens generated for each sample."})

    def __post_init__(self):
        if self.train_file and self.dataset_name:
            raise ValueError("give --train_file or --dataset_name, not both")
        if not self.sample_prompt:
            raise ValueError("--sample_prompt is empty: the sample at each evaluation needs a prompt to continue")
        if self.sample_max_new_tokens < 1:
            raise ValueError(f"--sample_max_new_tokens must be at least 1, got {self.sample_max_new_tokens}")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ValueError(f"--max_eval_samples must be at least 1, got {self.max_eval_samples}")
        if self.validation_split and not self.dataset_name:
            raise ValueError("--validation_split names a split of --dataset_name: give --dataset_name too")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"--validation_fraction must be between 0 and 1 (both excluded), got "
                             f"{self.validation_fraction}")


def main(argv=None) -> dict:
    run = start_recipe("pretrain", (ModelArguments, DataArguments), argv, default_config=DEFAULT_CONFIG)
    model_args, data_args = run.args
    training_args = run.training
    if model_args.model_name_or_path:
        check_continuing(model_args, data_args, run.given)

    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps: a stream has no length to count epochs in")

    # The global main process (rank 0 of all machines) trains and saves the tokenizer and stores the token ids; the
    # others wait for it, then read both.
    with training_args.main_process_first(local=False, desc="tokenizer and token ids"):
        parts = load_corpus(data_args, training_args.seed)
        tokenizer = build_tokenizer(model_args, data_args, parts["train"], training_args, run.checkpoint)
        model = build_model(model_args, tokenizer, run.common.attn_implementation, run.checkpoint, run.given)
        context = model.config.context_length
        windows = pretraining_windows(
            parts, tokenizer, context, data_args.stride, num_proc=data_args.num_proc, streaming=data_args.streaming,
            cache_dir=data_args.data_cache_dir,
        )
    if not data_args.streaming:
        check_enough_data(windows, training_args, f"windows of {context} tokens", "--context_length")
    print(describe_windows(windows, context, training_args.process_index))
    eval_windows = first_windows(windows["validation"], data_args.max_eval_samples)

    trainer = ScratchGPTTrainer(
        model=model,
        args=training_args,
        train_dataset=windows["train"],
        eval_dataset=eval_windows,
        processing_class=tokenizer,
        callbacks=[
            SampleGenerationCallback(tokenizer, data_args.sample_prompt, data_args.sample_max_new_tokens),
            LossPlotCallback(),
        ],
        log_perplexity=True,
        card=dict(
            datasets=[data_args.dataset_name] if data_args.dataset_name else [],
            tags=["text-generation", "pretraining"],
            base_model=model_args.model_name_or_path,
            description=f"ScratchGPT pretrained on {describe_corpus(data_args)} with `recipes/pretrain.py` of "
            "hf_scratchgpt.",
        ),
    )
    metrics = finish_recipe(trainer, run)
    sample = generate_sample(model, tokenizer, data_args.sample_prompt, data_args.sample_max_new_tokens)  # all ranks
    if trainer.is_world_process_zero():
        print(f"\nsample: {sample!r}")
        print(f"saved to {training_args.output_dir} (loss plot: {Path(training_args.output_dir) / 'loss.png'})")
    return metrics


def check_continuing(model_args: ModelArguments, data_args: DataArguments, given: frozenset[str]) -> None:
    """A model loaded to continue has its shape and its tokenizer: settings for a new one are errors, not ignored."""
    AutoConfig.from_pretrained(model_args.model_name_or_path)  # a model that cannot be found fails here
    for name in NEW_MODEL_SETTINGS:
        if name in given:
            raise ValueError(
                f"--{name} cannot apply to --model_name_or_path {model_args.model_name_or_path}, which has its own "
                "shape and tokenizer: leave it out"
            )
    if data_args.tokenizer == "bpe":
        raise ValueError(
            "--tokenizer bpe trains a new vocabulary, whose ids mean other tokens than the ones "
            f"{model_args.model_name_or_path} learned: leave --tokenizer out to continue with the model's own"
        )


def load_corpus(data_args: DataArguments, seed: int) -> dict[str, CorpusPart]:
    """The training and validation parts of the corpus, nothing read yet (files are read in pieces, never whole)."""
    if data_args.train_file:
        files = data_args.train_file
        corpus = files[0] if len(files) == 1 else [Path(f) for f in files]
    else:
        corpus = data_args.dataset_name or default_corpus()
    options = dict(text_column=data_args.text_column, streaming=data_args.streaming)
    if data_args.validation_split:
        return {
            side: corpus_parts(corpus, split=split, **options)
            for side, split in (("train", data_args.dataset_split), ("validation", data_args.validation_split))
        }
    fraction = 1 - data_args.validation_fraction
    return corpus_parts(corpus, fraction, by=data_args.split_by, seed=seed, split=data_args.dataset_split, **options)


def describe_windows(windows: dict, context: int, process_index: int) -> str:
    """One line per process: how many windows, and whether the token ids were reused from disk or made now."""
    if isinstance(windows["train"], IterableDataset):
        return f"data (process {process_index}): windows of {context} tokens, streamed"
    store = windows["train"].store
    made = "reused" if store.reused else "tokenized now"
    return (
        f"data (process {process_index}): {len(windows['train'])} training and {len(windows['validation'])} "
        f"validation windows of {context} tokens; token ids in {store.path} ({made})"
    )


def first_windows(windows, count: int | None):
    """The first `count` windows (all when `count` is None): --max_eval_samples, as transformers' run_clm.py."""
    if count is None:
        return windows
    if isinstance(windows, IterableDataset):
        return windows.take(count)
    return Subset(windows, range(min(count, len(windows))))


def describe_corpus(data_args: DataArguments) -> str:
    if data_args.train_file:
        return ", ".join(Path(f).name for f in data_args.train_file)
    return data_args.dataset_name or "the Python language reference (Python's `pydoc_data.topics`)"


def build_tokenizer(
    model_args: ModelArguments, data_args: DataArguments, train_part: CorpusPart, training_args, checkpoint
):
    """The tokenizer of the checkpoint being resumed, of the model being continued, or the one `--tokenizer` names;
    else a BPE tokenizer trained on the training text by the global main process and saved in output_dir, where
    the others (on every machine) read it once it is there."""
    if checkpoint is not None:
        return gpt2_tokenizer_from_dir(checkpoint)
    if data_args.tokenizer not in (None, "bpe"):
        return gpt2_tokenizer_from_dir(data_args.tokenizer)
    if model_args.model_name_or_path:
        return gpt2_tokenizer_from_dir(model_args.model_name_or_path)
    if not training_args.process_index == 0:
        return gpt2_tokenizer_from_dir(training_args.output_dir)
    tokenizer = train_bpe_tokenizer((piece["text"] for piece in train_part.pieces()), data_args.vocab_size)
    tokenizer.save_pretrained(training_args.output_dir)
    return tokenizer


SHAPE = ("context_length", "emb_dim", "n_layers", "n_heads", "qkv_bias", "tie_word_embeddings")


def build_model(
    model_args: ModelArguments, tokenizer, attn_implementation: str, checkpoint: str | None = None,
    given: frozenset[str] = frozenset(),
) -> ScratchGPTForCausalLM:
    """The model to train: the one continued (`--model_name_or_path`), the shape of the checkpoint resumed (its
    weights are Trainer's to load), or a new one: `--preset` if given, then the shape settings, the user's over the
    recipe's config (whose shape is the default model's, not a preset's)."""
    if model_args.model_name_or_path:
        overrides = {} if model_args.drop_rate is None else dict(drop_rate=model_args.drop_rate)
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, attn_implementation=attn_implementation, **overrides
        )
        check_vocabulary(tokenizer, model, model_args.model_name_or_path)
        return model
    if checkpoint is not None:
        config = resumed_config(checkpoint, model_args, given, attn_implementation)
    else:
        preset = model_args.preset
        overrides = {
            name: getattr(model_args, name)
            for name in (*SHAPE, "drop_rate", "init_scheme")
            if getattr(model_args, name) is not None and (not preset or name in given or name not in SHAPE)
        }
        overrides.update(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            attn_implementation=attn_implementation,
        )
        config = ScratchGPTConfig.from_preset(preset, **overrides) if preset else ScratchGPTConfig(**overrides)
    model = ScratchGPTForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model


def resumed_config(checkpoint: str, model_args: ModelArguments, given: frozenset[str], attn_implementation: str):
    """The config of the checkpoint resumed: the flags of its run may be repeated, a shape that differs is refused."""
    config = ScratchGPTConfig.from_pretrained(checkpoint, attn_implementation=attn_implementation)
    preset = ScratchGPTConfig.from_preset(model_args.preset) if "preset" in given else None
    for name in SHAPE:
        wanted = getattr(model_args, name) if name in given else getattr(preset, name, None)
        if wanted is not None and wanted != getattr(config, name):
            flag = f"--{name} {wanted}" if name in given else f"--preset {model_args.preset} ({name} {wanted})"
            raise ValueError(f"{flag} does not fit the checkpoint resumed, {checkpoint}, whose model has "
                             f"{', '.join(f'{n} {getattr(config, n)}' for n in SHAPE)}: leave it out")
    if model_args.drop_rate is not None:
        config.drop_rate = model_args.drop_rate
    return config

if __name__ == "__main__":
    run_recipe(main)
