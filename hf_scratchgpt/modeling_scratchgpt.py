"""Chapters 3 and 4, attention and the GPT architecture: ScratchGPT as a transformers model.

Read top to bottom in the order of the book: LayerNorm and GELU, the feed-forward network, causal multi-head
attention (chapter 3), the transformer block, the GPT model (chapter 4), then the heads for language modelling
(chapter 5) and classification (chapter 6), with the loading of GPT-2's and the book's weights (chapter 5).

The speed work lives beside this file, in `speedups_scratchgpt.py`: `DecodeLinear` (an `nn.Linear` that decodes
on all CPU cores), `fused_decode_block` (a block's decode step in two calls of C++, which `ScratchGPTBlock` tries
first), `KVCache` (the book's KV cache, appended in place) and the chunked training loss. These files are copied
next to the weights by `save_pretrained`, so that anyone can load a saved model with `trust_remote_code=True`: they
import only torch, transformers and their siblings in this folder.
"""

import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import capture_outputs

from .configuration_scratchgpt import ScratchGPTConfig
from .speedups_scratchgpt import (
    DecodeLinear,
    KVCache,
    chunked_causal_lm_loss,
    decode_sdpa_attention,
    fused_decode_block,
    packed_sdpa_attention,
)


class LayerNorm(nn.LayerNorm):
    """Layer normalisation (chapter 4.2): `(x - mean) / sqrt(var + eps) * weight + bias` over the last dim.

    The variance is the biased one (`unbiased=False`), as in the book and GPT-2. `nn.LayerNorm` computes exactly
    this in one fused kernel, and tools know it for what it is (Trainer does not decay its weights).
    `weight` and `bias` are the book's `scale` and `shift`.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__(emb_dim, eps=eps)


class GELU(nn.GELU):
    """GELU, tanh approximation (chapter 4.3): `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, as GPT-2 used.
    `nn.GELU(approximate="tanh")` computes exactly this in one kernel."""

    def __init__(self):
        super().__init__(approximate="tanh")


class FeedForward(nn.Module):
    """Position-wise feed-forward network (chapter 4.3): expand 4x, GELU, project back."""

    def __init__(self, config: ScratchGPTConfig):
        super().__init__()
        self.fc1 = DecodeLinear(config.emb_dim, 4 * config.emb_dim)
        self.act = GELU()
        self.fc2 = DecodeLinear(4 * config.emb_dim, config.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention written out, the book's chapter 3.5 math.

    query: (B, nh, Tq, hs); key, value: (B, nh, Tk, hs); attention_mask: additive (B, 1, Tq, Tk) with 0 where a
    query may look and a large negative number where it may not (causal and padding), or None.
    """
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling  # (B, nh, Tq, Tk)
    if attention_mask is not None:
        scores = scores + attention_mask
    elif query.shape[-2] > 1:  # no mask given: plain causal, the book's `mask.bool()[:T, :T]`
        q_len, k_len = query.shape[-2], key.shape[-2]
        future = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).triu(k_len - q_len + 1)
        scores = scores.masked_fill(future, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)  # (B, nh, Tq, hs)
    return out.transpose(1, 2), weights  # (B, Tq, nh, hs)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention (chapter 3.6).

    The book's three projections `W_query`, `W_key`, `W_value` are one fused `qkv` linear layer here (one matmul
    instead of three; the weights are the three stacked). The attention itself is `eager_attention_forward`
    above or any kernel transformers offers (`attn_implementation="sdpa"`, flash, flex), picked from the config.
    """

    def __init__(self, config: ScratchGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.head_dim = config.emb_dim // config.n_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True  # read by transformers' attention kernels
        self.qkv = DecodeLinear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.out_proj = DecodeLinear(config.emb_dim, config.emb_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = hidden_states.shape
        qkv = self.qkv(hidden_states).view(B, T, 3, self.n_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, T, hs)
        if cache is not None:  # append this step's keys and values; get back all of them so far
            key, value = cache.update(key, value, self.layer_idx)

        implementation = self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        if implementation == "sdpa" and kwargs.get("cu_seq_lens_q") is not None:
            attention_interface = packed_sdpa_attention  # packed sequences, each attended alone (speedups)
        elif implementation == "sdpa" and T == 1:
            attention_interface = decode_sdpa_attention  # a decode step (speedups)
        out, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.drop_rate if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        out = out.reshape(B, T, C)  # (B, T, nh, hs) -> (B, T, C): heads side by side
        return self.out_proj(out), weights


class ScratchGPTBlock(GradientCheckpointingLayer):
    """Transformer block (chapter 4.5): pre-LayerNorm attention and feed-forward, each with a residual shortcut."""

    def __init__(self, config: ScratchGPTConfig, layer_idx: int):
        super().__init__()
        self.norm1 = LayerNorm(config.emb_dim, config.layer_norm_eps)
        self.att = MultiHeadAttention(config, layer_idx)
        self.norm2 = LayerNorm(config.emb_dim, config.layer_norm_eps)
        self.ff = FeedForward(config)
        self.drop_shortcut = nn.Dropout(config.drop_rate)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        fused = fused_decode_block(self, hidden_states, attention_mask, cache, kwargs)
        if fused is not None:  # a decode step: the lines below in two calls of C++ (speedups)
            return fused
        attn_out, _ = self.att(self.norm1(hidden_states), attention_mask=attention_mask, cache=cache, **kwargs)
        hidden_states = hidden_states + self.drop_shortcut(attn_out)
        hidden_states = hidden_states + self.drop_shortcut(self.ff(self.norm2(hidden_states)))
        return hidden_states


# The classes of this file (and its config) that `trust_remote_code` loading finds through a saved config.
AUTO_MAP = {
    "AutoConfig": "configuration_scratchgpt.ScratchGPTConfig",
    "AutoModel": "modeling_scratchgpt.ScratchGPTModel",
    "AutoModelForCausalLM": "modeling_scratchgpt.ScratchGPTForCausalLM",
    "AutoModelForSequenceClassification": "modeling_scratchgpt.ScratchGPTForSequenceClassification",
}


class ScratchGPTPreTrainedModel(PreTrainedModel):
    config: ScratchGPTConfig
    config_class = ScratchGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ScratchGPTBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # What `capture_outputs` records with forward hooks when asked for `output_hidden_states` / `output_attentions`:
    # each block's output, and the second output of each attention (its weights; None from kernels such as sdpa).
    _can_record_outputs = {"hidden_states": ScratchGPTBlock, "attentions": MultiHeadAttention}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loading, with a corrupt weights file named in the error instead of a bare header error."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as err:
            raise OSError(f"{_broken_safetensors(pretrained_model_name_or_path)} cannot be read: {err}") from None

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' saving, with every Auto class in `auto_map`: a language model saved here also loads as a
        classifier (the book's chapter 6 start) or a bare model with `trust_remote_code`, not only as itself."""
        self.config.auto_map = {**AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """`config.init_scheme="gpt2"`: GPT-2's initialisation, N(0, 0.02) weights, zero biases, unit LayerNorms (the
        base class), and the residual projections scaled down by 1/sqrt(2 * n_layers), one factor per branch.
        `"book"`: PyTorch's defaults, as the book's `GPTModel` gets them: N(0, 1) embeddings, linear layers
        uniform in +-1/sqrt(fan_in) (weights by `kaiming_uniform_(a=sqrt(5))`)."""
        if self.config.init_scheme == "book":
            if isinstance(module, nn.Linear):
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                if module.bias is not None:
                    bound = 1 / math.sqrt(module.in_features)
                    init.uniform_(module.bias, -bound, bound)
            elif isinstance(module, nn.Embedding):
                init.normal_(module.weight, mean=0.0, std=1.0)
            elif isinstance(module, nn.LayerNorm):
                init.ones_(module.weight)
                init.zeros_(module.bias)
            return
        super()._init_weights(module)
        std = self.config.initializer_range / math.sqrt(2 * self.config.n_layers)
        if isinstance(module, MultiHeadAttention):
            init.normal_(module.out_proj.weight, mean=0.0, std=std)
        elif isinstance(module, FeedForward):
            init.normal_(module.fc2.weight, mean=0.0, std=std)


def _broken_safetensors(folder) -> str:
    """The first `.safetensors` file in `folder` that does not open, else a generic description."""
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                try:
                    with safe_open(os.path.join(folder, name), framework="pt"):
                        pass
                except SafetensorError:
                    return os.path.join(folder, name)
    return f"a safetensors weights file of {folder}"


class ScratchGPTModel(ScratchGPTPreTrainedModel):
    """The GPT backbone (chapter 4.6): token + position embeddings, `n_layers` blocks, a final LayerNorm."""

    def __init__(self, config: ScratchGPTConfig):
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.emb_dim)
        self.pos_emb = nn.Embedding(config.context_length, config.emb_dim)  # absolute, learned, as GPT-2
        self.drop_emb = nn.Dropout(config.drop_rate)
        self.trf_blocks = nn.ModuleList([ScratchGPTBlock(config, i) for i in range(config.n_layers)])
        self.final_norm = LayerNorm(config.emb_dim, config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_emb = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # transformers' models: warn, then use it
    @capture_outputs  # hidden states and attentions by hooks (`_can_record_outputs`), and `return_dict=False`
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        _check_kwargs(kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("ScratchGPTModel takes exactly one of input_ids or inputs_embeds")
        if use_cache is None:  # a cache serves generation; training has no use for one
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.tok_emb(input_ids)  # (B, T, C)
        if use_cache and cache is None:
            cache = KVCache(self.config.context_length)

        if position_ids is None:
            past_len = cache.get_seq_length() if cache is not None else 0  # a tensor in a StaticCache
            position_ids = _position_ids(attention_mask, past_len, inputs_embeds.shape[1], inputs_embeds.device)
        if not torch.compiler.is_compiling():  # a branch on tensor values: no graph can hold it
            _check_context_length(position_ids, self.config.context_length)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = self.drop_emb(inputs_embeds + self.pos_emb(position_ids))
        for block in self.trf_blocks:
            hidden_states = block(hidden_states, attention_mask=causal_mask, cache=cache, **kwargs)
        hidden_states = self.final_norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


def _check_kwargs(kwargs: dict) -> None:
    """Refuse a keyword no part of ScratchGPT reads, as Python does for a plain function: the blocks take `**kwargs`
    only for transformers' model-agnostic ones (`TransformersKwargs`: output flags, flash attention's packed-sequence
    lengths, ...), so anything else would be dropped without a word."""
    unknown = [key for key in kwargs if key not in TransformersKwargs.__optional_keys__]  # torch.compile traces it
    if unknown:
        raise TypeError(f"ScratchGPT's forward() got unexpected keyword arguments: {', '.join(sorted(unknown))}")


def _check_context_length(position_ids: torch.Tensor, context_length: int) -> None:
    """Refuse positions past the last of `pos_emb`, with a message instead of an index error. Positions, not tokens:
    sequences packed into one row (padding-free training) restart their positions, and may hold more tokens."""
    longest = int(position_ids.max()) + 1 if position_ids.numel() else 0
    if longest > context_length:
        raise ValueError(
            f"ScratchGPT got a sequence of {longest} tokens (positions 0 to {longest - 1}), longer than its "
            f"context_length of {context_length}; truncate the input"
        )


def _position_ids(attention_mask: torch.Tensor | None, past_len, seq_len: int, device) -> torch.Tensor:
    """Positions of the new tokens, counted over real tokens only: a left-padded row starts at position 0 at its
    first real token, so it reads exactly as it would alone (GPT-2's absolute positions need this). `past_len` is
    an int, or a 0-d tensor in a `StaticCache`."""
    if attention_mask is not None and attention_mask.ndim == 2:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]  # (B, T)
    return (torch.arange(seq_len, device=device) + past_len).unsqueeze(0)  # (1, T)


class ScratchGPTForCausalLM(ScratchGPTPreTrainedModel, GenerationMixin):
    """ScratchGPT with its language-modelling head (chapters 4.6 and 5): next-token logits over the vocabulary.

    The head's weight is the token embedding's (one tensor) when `config.tie_word_embeddings`, as in GPT-2.
    """

    _tied_weights_keys = {"lm_head.weight": "model.tok_emb.weight"}

    def __init__(self, config: ScratchGPTConfig):
        super().__init__(config)
        self.model = ScratchGPTModel(config)
        self.lm_head = DecodeLinear(config.emb_dim, config.vocab_size, bias=False)  # the book's `out_head`
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`generate()` decodes with a `KVCache` where transformers would build a plain `DynamicCache`, its storage
        bounded by the context and by the length this call generates to."""
        users_cache = model_kwargs.get("cache")
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if users_cache is None and type(cache) is DynamicCache and not cache.offloading:
            model_kwargs["cache"] = KVCache(self.config.context_length, expected_len=generation_config.max_length)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """`labels` are the input ids themselves (-100 where no loss is wanted): the loss shifts them by one.
        A `shift_labels` keyword, the targets already shifted (what sequence-parallel training passes), replaces
        them. It is not a named parameter: Trainer takes every parameter named `*label*` for a label it must find in
        each batch.

        In training mode with labels, the loss is computed chunk by chunk (`config.loss_chunk_size`) and no logits
        are returned; set `loss_chunk_size=0` to get them.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        has_targets = labels is not None or shift_labels is not None
        chunked = self.config.loss_chunk_size > 0 and self.training and torch.is_grad_enabled()
        if has_targets and chunked and isinstance(logits_to_keep, int) and logits_to_keep == 0:
            # Training: the loss without (B, T, vocab) logits, which are then not returned.
            loss = chunked_causal_lm_loss(
                hidden_states,
                self.lm_head.weight,
                labels,
                self.config.loss_chunk_size,
                num_items_in_batch,
                shift_labels=shift_labels,
            )
            return CausalLMOutputWithPast(
                loss=loss, cache=outputs.cache, hidden_states=outputs.hidden_states, attentions=outputs.attentions
            )

        if isinstance(logits_to_keep, int):  # generate() asks for the last position only
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)  # (B, T, vocab)

        loss = None
        if has_targets:
            loss = self.loss_function(
                logits,
                labels,
                vocab_size=self.config.vocab_size,
                num_items_in_batch=num_items_in_batch,
                shift_labels=shift_labels,
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    # GPT-2 and book checkpoints in and out; the mapping of names lives in conversion.py.
    @classmethod
    def from_gpt2(cls, name_or_model, **kwargs) -> "ScratchGPTForCausalLM":
        """Load a transformers GPT-2 checkpoint (a Hub id such as `openai-community/gpt2`, a local folder, or a
        `GPT2LMHeadModel`) as ScratchGPT; `kwargs` go to `GPT2LMHeadModel.from_pretrained`."""
        from transformers import GPT2LMHeadModel

        from .conversion import config_from_gpt2, state_dict_from_gpt2

        gpt2 = name_or_model
        if not isinstance(gpt2, GPT2LMHeadModel):
            gpt2 = GPT2LMHeadModel.from_pretrained(name_or_model, **kwargs)
        config = config_from_gpt2(gpt2.config)
        return _build_with_state_dict(cls, config, state_dict_from_gpt2(gpt2.state_dict(), config))

    def to_gpt2(self):
        """This model as a transformers `GPT2LMHeadModel` with the same weights, to run wherever GPT-2 runs."""
        from transformers import GPT2LMHeadModel

        from .conversion import config_to_gpt2, state_dict_to_gpt2

        gpt2_config = config_to_gpt2(self.config)
        gpt2 = GPT2LMHeadModel(gpt2_config).to(self.dtype)
        gpt2.load_state_dict(state_dict_to_gpt2(self.state_dict(), self.config))  # strict: every weight
        return gpt2.to(self.device).eval()

    @classmethod
    def from_book_state_dict(cls, state_dict_or_path, n_heads: int | None = None, **config_overrides):
        """Load the book's `GPTModel` weights (`torch.save(model.state_dict(), path)`, a path or the dict itself).

        The shapes give vocabulary, width, context, depth, qkv bias and tying; the number of heads cannot be seen in
        the weights: pass `n_heads`, or it is GPT-2's for that width (768 -> 12, 1024 -> 16, 1280 -> 20, 1600 -> 25).
        """
        from .conversion import config_from_book_state_dict, state_dict_from_book

        state_dict = state_dict_or_path
        if not isinstance(state_dict, dict):
            state_dict = torch.load(state_dict_or_path, map_location="cpu", weights_only=True)
        config = config_from_book_state_dict(state_dict, n_heads=n_heads, **config_overrides)
        return _build_with_state_dict(cls, config, state_dict_from_book(state_dict, config))


def _build_with_state_dict(cls, config: ScratchGPTConfig, state_dict: dict) -> ScratchGPTPreTrainedModel:
    model = cls(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit ScratchGPT: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


class ScratchGPTForSequenceClassification(ScratchGPTPreTrainedModel):
    """ScratchGPT with a classification head (chapter 6): logits of the last real token of each sequence.

    The last real token is found from `attention_mask` (works with left or right padding, and with pad == eos);
    without a mask, from `config.pad_token_id`; with neither, it is the last position.
    """

    def __init__(self, config: ScratchGPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = ScratchGPTModel(config)
        self.score = nn.Linear(config.emb_dim, config.num_labels)  # the book's new `out_head`
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("use_cache", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, C)
        batch, seq_len = hidden_states.shape[:2]
        positions = torch.arange(seq_len, device=hidden_states.device)
        if attention_mask is not None:
            last = (positions * attention_mask.to(hidden_states.device)).argmax(-1)  # (B,)
        elif input_ids is not None and self.config.pad_token_id is not None:
            last = (positions * (input_ids != self.config.pad_token_id)).argmax(-1)
        else:
            last = torch.full((batch,), seq_len - 1, device=hidden_states.device)
        pooled = hidden_states[torch.arange(batch, device=hidden_states.device), last]  # (B, C)
        logits = self.score(pooled)  # (B, num_labels)

        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, num_items_in_batch=num_items_in_batch)
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "ScratchGPTPreTrainedModel",
    "ScratchGPTModel",
    "ScratchGPTForCausalLM",
    "ScratchGPTForSequenceClassification",
]
