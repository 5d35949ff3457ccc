"""Tests of hf_scratchgpt/training.py: the sample text, the loss plot, perplexity in the logs, the model card."""

import math
from unittest import mock

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import TrainingArguments

from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM
from hf_scratchgpt.data import default_corpus
from hf_scratchgpt.tokenization import train_bpe_tokenizer
from hf_scratchgpt.training import ScratchGPTTrainer, generate_sample, plot_losses, write_model_card


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(default_corpus()[:5], vocab_size=300)


def tiny_model(tokenizer, **overrides):
    torch.manual_seed(0)
    config = ScratchGPTConfig.from_preset("tiny", vocab_size=len(tokenizer), drop_rate=0.0, **overrides)
    return ScratchGPTForCausalLM(config)


def test_generate_sample_is_greedy_and_fits_the_context(tokenizer):
    model = tiny_model(tokenizer, eos_token_id=None).train()
    text = generate_sample(model, tokenizer, "The for statement", max_new_tokens=5)
    assert model.training  # put back as it was
    ids = tokenizer("The for statement", return_tensors="pt").input_ids
    assert text == tokenizer.decode(model.eval().generate(ids, max_new_tokens=5, do_sample=False)[0])
    long_prompt = "word " * 200  # more tokens than the context of 64
    out_ids = tokenizer(generate_sample(model, tokenizer, long_prompt, max_new_tokens=10)).input_ids
    assert len(out_ids) <= model.config.context_length


def test_plot_losses_draws_a_png_and_needs_losses(tmp_path):
    history = [
        {"loss": 5.0, "num_input_tokens_seen": 100, "step": 1},
        {"loss": 4.0, "num_input_tokens_seen": 200, "step": 2},
        {"eval_loss": 4.5, "num_input_tokens_seen": 200, "step": 2},
    ]
    path = plot_losses(history, tmp_path / "plots" / "loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_losses([{"learning_rate": 0.1, "step": 1}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_trainer_logs_perplexity_and_writes_a_hub_model_card(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    windows = Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5, 6, 7, 8]] * 4, "labels": [[1, 2, 3, 4, 5, 6, 7, 8]] * 4})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, use_cpu=True,
                             report_to="none", prediction_loss_only=True, disable_tqdm=True)
    trainer = ScratchGPTTrainer(model=model, args=args, train_dataset=windows, eval_dataset=windows,
                                log_perplexity=True, card=dict(datasets=["me/corpus"], tags=["test"]))
    trainer.train()
    metrics = trainer.evaluate()
    logged = [entry for entry in trainer.state.log_history if "eval_loss" in entry][-1]
    assert logged["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))

    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "text-generation"
    assert header["datasets"] == ["me/corpus"] and "test" in header["tags"] and header["license"]
    assert "trust_remote_code=True" in card and f"| eval_loss | {metrics['eval_loss']:.4g} |" in card


def test_model_card_lists_the_setup(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, use_cpu=True, report_to="none")
    path = write_model_card(tmp_path, model, args, [{"eval_loss": 2.5}], description="A test model.")
    card = path.read_text()
    assert "A test model." in card and "| layers / heads / width / context | 2 / 4 / 32 / 64 |" in card
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in card


def test_trainer_decays_matrices_but_not_biases_or_layer_norms(tokenizer, tmp_path):
    model = tiny_model(tokenizer, qkv_bias=True)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", weight_decay=0.1)
    decayed = set(ScratchGPTTrainer(model=model, args=args).get_decay_parameter_names(model))
    names = {name for name, _ in model.named_parameters()}
    assert {n for n in names if "norm" in n or n.endswith("bias")}.isdisjoint(decayed)
    assert "model.trf_blocks.0.att.qkv.weight" in decayed and "model.tok_emb.weight" in decayed


@pytest.mark.slow
def test_bf16_training_on_cpu_runs_in_bfloat16_with_float32_weights_and_the_float32_loss(tokenizer, tmp_path):
    """`--bf16` on a CPU: Trainer's autocast runs the matmuls in bfloat16, chunked loss included, and the weights
    stay float32; the losses follow float32 training's."""
    torch.manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (8, 32)).tolist()
    windows = Dataset.from_dict({"input_ids": ids, "labels": ids})
    losses, matmul_dtypes = {}, set()
    for bf16 in (False, True):
        model = tiny_model(tokenizer, loss_chunk_size=16)
        hook = model.model.trf_blocks[0].ff.fc1.register_forward_hook(lambda m, i, out: matmul_dtypes.add(out.dtype))
        args = TrainingArguments(output_dir=str(tmp_path / str(bf16)), max_steps=8, per_device_train_batch_size=2,
                                 learning_rate=1e-3, use_cpu=True, bf16=bf16, report_to="none", logging_steps=1,
                                 save_strategy="no", disable_tqdm=True)
        trainer = ScratchGPTTrainer(model=model, args=args, train_dataset=windows)
        trainer.train()
        hook.remove()
        losses[bf16] = torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
        assert all(param.dtype == torch.float32 for param in model.parameters())
    assert matmul_dtypes == {torch.float32, torch.bfloat16}
    assert len(losses[True]) == 8 and losses[True][-1] < losses[True][0]
    torch.testing.assert_close(losses[True], losses[False], rtol=0.02, atol=0)


def test_loss_only_evaluation_is_the_plain_loss_without_the_logits(tokenizer, tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (6, 32))
    windows = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    model = tiny_model(tokenizer, loss_chunk_size=16)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=6, use_cpu=True, report_to="none",
                             disable_tqdm=True)  # no compute_metrics: Trainer evaluates the loss only
    with mock.patch.object(model.lm_head, "forward", wraps=model.lm_head.forward) as head:
        loss = ScratchGPTTrainer(model=model, args=args, eval_dataset=windows).evaluate()["eval_loss"]
    assert head.call_count == 0  # the chunked loss reads the head's weight, it makes no logits
    with torch.no_grad():
        expected = model.eval()(ids, labels=ids).loss.item()  # the plain path: all the logits
    assert loss == pytest.approx(expected, rel=1e-5)
