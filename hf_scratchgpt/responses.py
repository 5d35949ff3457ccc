"""Chapter 7, extracting and scoring responses: a tuned model answers the test instructions, and we measure how well.

The book's sections 7.7 and 7.8: the model answers every test entry greedily, the answer is the generated text
without the `### Response:` header, and the answers are saved beside the entries (`instruction-data-with-response
.json` in the book, `test-responses.json` here). `score_responses` then measures them without any server:
ROUGE-L and exact match against the reference outputs (`evaluate` modules shipped in `hf_scratchgpt.metrics`), the
share of answers that ended with end-of-text by themselves (did the model learn to stop), and the mean answer
length. The judge of section 7.8, a larger LLM, is `hf_scratchgpt.judge`.
"""

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .data.instruction import render_prompt, response_text
from .metrics import load_metric


RESPONSE_HEADER = "### Response:"


@torch.no_grad()
def answer_instructions(
    model,
    tokenizer,
    entries: Sequence[Mapping],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict]:
    """Each entry with the model's greedy answer to it: `model_response`, and `stopped` (it ended with end-of-text).

    Batches of prompts of similar length, left-padded, decoded with the KV cache; a row stops at end-of-text or
    after `max_new_tokens` tokens, or where the model's context ends.
    """
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # the new tokens of every row start at the same column
    context = model.config.context_length
    prompts = [tokenizer(render_prompt(entry), add_special_tokens=False).input_ids[-(context - 1) :] for entry in entries]
    order = sorted(range(len(entries)), key=lambda i: len(prompts[i]))  # similar lengths batch with little padding
    answers: dict[int, dict] = {}
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="Answering", disable=not progress):
            rows = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [prompts[i] for i in rows]}, return_tensors="pt").to(model.device)
            width = batch["input_ids"].shape[1]
            out = model.generate(
                **batch,
                max_new_tokens=min(max_new_tokens, context - width),
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
            for row, new_ids in zip(rows, out[:, width:].tolist()):
                stopped = tokenizer.eos_token_id in new_ids
                new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id)] if stopped else new_ids
                text = tokenizer.decode(new_ids, skip_special_tokens=True)
                answers[row] = {**entries[row], "model_response": text.replace(RESPONSE_HEADER, "").strip(),
                                "stopped": stopped}
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side
    return [answers[i] for i in range(len(entries))]


def score_responses(answered: Sequence[Mapping]) -> dict[str, float]:
    """ROUGE-L F1 and exact match of `model_response` against the reference response, the share of answers that
    stopped by themselves, and their mean length in words."""
    predictions = [entry["model_response"] for entry in answered]
    references = [response_text(entry) for entry in answered]
    rouge = load_metric("rouge_l").compute(predictions=predictions, references=references)
    exact = load_metric("exact_match").compute(predictions=predictions, references=references)
    return {
        "rouge_l": rouge["rouge_l"],
        "exact_match": exact["exact_match"],
        "stop_rate": sum(bool(entry.get("stopped")) for entry in answered) / max(len(answered), 1),
        "mean_response_words": sum(len(p.split()) for p in predictions) / max(len(predictions), 1),
    }


__all__ = ["RESPONSE_HEADER", "answer_instructions", "score_responses"]
