"""ScratchGPT under TRL's `SFTTrainer`, as practitioners fine-tune (chapter 7 with another trainer)."""

import pytest
import torch
from datasets import Dataset

from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM
from hf_scratchgpt.data.instruction import add_chat_template, to_messages


@pytest.fixture
def chat_data(shared_data) -> Dataset:
    import json

    entries = json.loads((shared_data / "instruction" / "instruction-data.json").read_text())[:64]
    return Dataset.from_list([{"messages": to_messages(entry)} for entry in entries])


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sft_trainer_trains_scratchgpt(chat_data, gpt2, tmp_path, packing):
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    config = ScratchGPTConfig.from_preset("tiny", vocab_size=50257, context_length=256, bos_token_id=50256,
                                          eos_token_id=50256, pad_token_id=50256, drop_rate=0.0)
    model = ScratchGPTForCausalLM(config)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=3e-3, max_length=256,
        packing=packing, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        assistant_only_loss=True,  # the `{% generation %}` block of our template marks the answers
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=chat_data, processing_class=add_chat_template(gpt2))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert not torch.equal(model.model.trf_blocks[0].att.qkv.weight, start["model.trf_blocks.0.att.qkv.weight"])
    if packing:  # TRL packs padding-free, with position_ids that restart at each conversation
        batch = next(iter(trainer.get_train_dataloader()))
        assert "position_ids" in batch and (batch["position_ids"] == 0).sum() > 1
