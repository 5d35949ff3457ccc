"""Chapter 4, the GPT architecture: ScratchGPT's configuration, its named presets and their validation.

The field names are the book's (`GPT_CONFIG_124M` in chapter 4); the standard transformers names
(`hidden_size`, `num_attention_heads`, ...) are aliases of them, so generic code such as `generate()`,
`DynamicCache` or peft reads them as it reads any model's.
"""

from transformers import PreTrainedConfig


# GPT-2's four released sizes (Radford et al. 2019, table 2; the book's chapter 5 `model_configs`).
# All four use GPT-2's vocabulary, a 1,024-token context and biases on the query/key/value projection.
PRESETS: dict[str, dict] = {
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12),  # 124M parameters
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
    # Not a GPT-2 size: a model small enough to build and run in a unit test in milliseconds.
    "tiny": dict(
        vocab_size=1000, context_length=64, emb_dim=32, n_layers=2, n_heads=4, bos_token_id=0, eos_token_id=0
    ),
}
_GPT2_SHAPE = dict(vocab_size=50257, context_length=1024, qkv_bias=True)


class ScratchGPTConfig(PreTrainedConfig):
    r"""Configuration of a ScratchGPT model.

    The defaults are the book's `GPT_CONFIG_124M`: GPT-2 small's shape, trained from scratch with no bias
    on the query/key/value projection. Use `ScratchGPTConfig.from_preset("gpt2-small")` for the shape of
    OpenAI's released checkpoints.

    Args:
        vocab_size: number of token ids; GPT-2's BPE vocabulary has 50,257.
        context_length: the longest sequence the model reads (absolute position embeddings: one per position).
        emb_dim: width of the residual stream (GPT-2 small: 768).
        n_heads: attention heads per layer; `emb_dim` must be a multiple of it.
        n_layers: transformer blocks.
        drop_rate: dropout on embeddings, attention weights and each residual branch.
        qkv_bias: a bias on the query/key/value projection (False in the book's from-scratch model, True in GPT-2).
        layer_norm_eps: added to the variance in LayerNorm (GPT-2 and the book: 1e-5).
        initializer_range: standard deviation of the normal initialisation (GPT-2: 0.02).
        init_scheme: "gpt2" initialises as GPT-2 (normal with `initializer_range`, residual projections scaled by
            1/sqrt(2 n_layers)); "book" as the book's plain PyTorch model (N(0, 1) embeddings, PyTorch's uniform
            linear layers), which memorises a small corpus such as "The Verdict" much faster at batch 2.
        loss_chunk_size: in training with labels, the loss computes the (tokens x vocab) logits this many rows at
            a time and returns none (see `ChunkedLinearCrossEntropy`); 0 computes and returns all of them.
        tie_word_embeddings: share one matrix between token embedding and output head, as GPT-2 does
            (the book's chapter 4 model keeps two).
    """

    model_type = "scratchgpt"
    attribute_map = {
        "hidden_size": "emb_dim",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "context_length",
    }

    vocab_size: int = 50257  # GPT-2's byte-level BPE vocabulary
    context_length: int = 1024  # GPT-2's context
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False  # the book trains without; GPT-2's checkpoints have one
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    init_scheme: str = "gpt2"  # "gpt2": N(0, initializer_range); "book": PyTorch's defaults, as the book's model
    use_cache: bool = True
    loss_chunk_size: int = 1024  # rows of logits made at a time by the training loss; 0: all at once, returned
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256  # <|endoftext|> in GPT-2's vocabulary
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ScratchGPTConfig.{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(
                f"ScratchGPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.init_scheme not in ("gpt2", "book"):
            raise ValueError(f"ScratchGPTConfig.init_scheme must be 'gpt2' or 'book', got {self.init_scheme!r}")
        if self.loss_chunk_size < 0:
            raise ValueError(f"ScratchGPTConfig.loss_chunk_size must be >= 0, got {self.loss_chunk_size!r}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"ScratchGPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"ScratchGPTConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ScratchGPTConfig":
        """A named shape (`gpt2-small`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `tiny`), with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown ScratchGPT preset {name!r}; choose one of {', '.join(PRESETS)}")
        fields = dict(_GPT2_SHAPE) if name.startswith("gpt2") else {}
        fields.update(PRESETS[name])
        fields.update(overrides)
        return cls(**fields)


__all__ = ["ScratchGPTConfig", "PRESETS"]
