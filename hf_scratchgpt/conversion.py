"""Chapter 5, loading pretrained weights: GPT-2 (transformers) and the book's `GPTModel` checkpoints in and out.

Pure name-and-shape mappings between state dicts, used by `ScratchGPTForCausalLM.from_gpt2`, `.to_gpt2` and
`.from_book_state_dict`. Like the modeling file, this one imports only torch, transformers and its siblings, so
that it travels with a saved model for `trust_remote_code`.

GPT-2 stores its projections as `Conv1D` with weights of shape (in, out); ScratchGPT's `nn.Linear` holds (out, in),
hence the transposes. GPT-2 always has a bias on `c_attn`; ScratchGPT may not (`qkv_bias=False`, as in the book),
and then exports a zero bias.
"""

import torch
from transformers import GPT2Config

from .configuration_scratchgpt import ScratchGPTConfig


# ScratchGPT name -> GPT-2 name, per block; `True` where GPT-2's Conv1D weight is transposed.
_GPT2_BLOCK = {
    "norm1.weight": ("ln_1.weight", False),
    "norm1.bias": ("ln_1.bias", False),
    "att.qkv.weight": ("attn.c_attn.weight", True),
    "att.qkv.bias": ("attn.c_attn.bias", False),
    "att.out_proj.weight": ("attn.c_proj.weight", True),
    "att.out_proj.bias": ("attn.c_proj.bias", False),
    "norm2.weight": ("ln_2.weight", False),
    "norm2.bias": ("ln_2.bias", False),
    "ff.fc1.weight": ("mlp.c_fc.weight", True),
    "ff.fc1.bias": ("mlp.c_fc.bias", False),
    "ff.fc2.weight": ("mlp.c_proj.weight", True),
    "ff.fc2.bias": ("mlp.c_proj.bias", False),
}
_GPT2_TOP = {
    "model.tok_emb.weight": "transformer.wte.weight",
    "model.pos_emb.weight": "transformer.wpe.weight",
    "model.final_norm.weight": "transformer.ln_f.weight",
    "model.final_norm.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}


def config_from_gpt2(gpt2_config: GPT2Config) -> ScratchGPTConfig:
    if gpt2_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(
            f"GPT-2 checkpoint uses activation {gpt2_config.activation_function!r}; ScratchGPT has tanh-GELU only"
        )
    if gpt2_config.n_inner not in (None, 4 * gpt2_config.n_embd):
        raise ValueError(f"GPT-2 checkpoint has n_inner={gpt2_config.n_inner}; ScratchGPT's MLP is 4 x n_embd")
    return ScratchGPTConfig(
        vocab_size=gpt2_config.vocab_size,
        context_length=gpt2_config.n_positions,
        emb_dim=gpt2_config.n_embd,
        n_heads=gpt2_config.n_head,
        n_layers=gpt2_config.n_layer,
        drop_rate=gpt2_config.resid_pdrop,
        qkv_bias=True,
        layer_norm_eps=gpt2_config.layer_norm_epsilon,
        initializer_range=gpt2_config.initializer_range,
        tie_word_embeddings=gpt2_config.tie_word_embeddings,
        bos_token_id=gpt2_config.bos_token_id,
        eos_token_id=gpt2_config.eos_token_id,
        pad_token_id=gpt2_config.pad_token_id,
    )


def config_to_gpt2(config: ScratchGPTConfig) -> GPT2Config:
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.context_length,
        n_embd=config.emb_dim,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        activation_function="gelu_new",
        resid_pdrop=config.drop_rate,
        embd_pdrop=config.drop_rate,
        attn_pdrop=config.drop_rate,
        layer_norm_epsilon=config.layer_norm_eps,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def state_dict_from_gpt2(gpt2_sd: dict, config: ScratchGPTConfig) -> dict:
    sd = {ours: gpt2_sd[theirs] for ours, theirs in _GPT2_TOP.items() if theirs in gpt2_sd}
    for i in range(config.n_layers):
        for ours, (theirs, transpose) in _GPT2_BLOCK.items():
            tensor = gpt2_sd[f"transformer.h.{i}.{theirs}"]
            sd[f"model.trf_blocks.{i}.{ours}"] = tensor.t() if transpose else tensor
    return {k: v.contiguous() for k, v in sd.items()}


def state_dict_to_gpt2(sd: dict, config: ScratchGPTConfig) -> dict:
    gpt2_sd = {theirs: sd[ours] for ours, theirs in _GPT2_TOP.items() if ours in sd}
    for i in range(config.n_layers):
        for ours, (theirs, transpose) in _GPT2_BLOCK.items():
            key = f"model.trf_blocks.{i}.{ours}"
            if key not in sd:  # no qkv bias: GPT-2 needs one, and zero is the same function
                tensor = sd[f"model.trf_blocks.{i}.att.out_proj.bias"].new_zeros(3 * config.emb_dim)
            else:
                tensor = sd[key]
            gpt2_sd[f"transformer.h.{i}.{theirs}"] = tensor.t() if transpose else tensor
    return {k: v.contiguous() for k, v in gpt2_sd.items()}


# The book's GPTModel (chapter 4): tok_emb, pos_emb, trf_blocks.i.{att.W_query|W_key|W_value|out_proj,
# ff.layers.0|2, norm1|norm2.scale|shift}, final_norm.scale|shift, out_head.
_BOOK_GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}


def config_from_book_state_dict(sd: dict, n_heads: int | None = None, **overrides) -> ScratchGPTConfig:
    if "tok_emb.weight" not in sd or "pos_emb.weight" not in sd:
        raise ValueError(
            "not a state dict of the book's GPTModel: it has no tok_emb.weight / pos_emb.weight "
            f"(first keys: {list(sd)[:5]})"
        )
    vocab_size, emb_dim = sd["tok_emb.weight"].shape
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("trf_blocks."))
    if n_heads is None:
        if emb_dim not in _BOOK_GPT2_HEADS:
            raise ValueError(f"cannot tell the number of heads of a model {emb_dim} wide: pass n_heads=")
        n_heads = _BOOK_GPT2_HEADS[emb_dim]
    tied = "out_head.weight" not in sd or torch.equal(sd["out_head.weight"], sd["tok_emb.weight"])
    fields = dict(
        vocab_size=vocab_size,
        context_length=sd["pos_emb.weight"].shape[0],
        emb_dim=emb_dim,
        n_heads=n_heads,
        n_layers=n_layers,
        qkv_bias="trf_blocks.0.att.W_query.bias" in sd,
        tie_word_embeddings=tied,
    )
    fields.update(overrides)
    return ScratchGPTConfig(**fields)


def state_dict_from_book(sd: dict, config: ScratchGPTConfig) -> dict:
    ours = {
        "model.tok_emb.weight": sd["tok_emb.weight"],
        "model.pos_emb.weight": sd["pos_emb.weight"],
        "model.final_norm.weight": sd["final_norm.scale"],
        "model.final_norm.bias": sd["final_norm.shift"],
    }
    if not config.tie_word_embeddings:
        ours["lm_head.weight"] = sd["out_head.weight"]
    for i in range(config.n_layers):
        book, new = f"trf_blocks.{i}.", f"model.trf_blocks.{i}."
        ours[new + "att.qkv.weight"] = torch.cat([sd[f"{book}att.W_{p}.weight"] for p in ("query", "key", "value")])
        if config.qkv_bias:
            ours[new + "att.qkv.bias"] = torch.cat([sd[f"{book}att.W_{p}.bias"] for p in ("query", "key", "value")])
        for name in ("weight", "bias"):
            ours[f"{new}att.out_proj.{name}"] = sd[f"{book}att.out_proj.{name}"]
            ours[f"{new}ff.fc1.{name}"] = sd[f"{book}ff.layers.0.{name}"]
            ours[f"{new}ff.fc2.{name}"] = sd[f"{book}ff.layers.2.{name}"]
        for norm in ("norm1", "norm2"):
            ours[f"{new}{norm}.weight"] = sd[f"{book}{norm}.scale"]
            ours[f"{new}{norm}.bias"] = sd[f"{book}{norm}.shift"]
    return ours
