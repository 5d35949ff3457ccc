"""Tests of recipes/classify.py and hf_scratchgpt/finetuning.py: the book's chapter 6 spam classifier, and
classifiers of any labelled texts."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    TrainingArguments,
    pipeline,
)

from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM, ScratchGPTForSequenceClassification
from hf_scratchgpt.data import load_sms_spam, sms_spam_splits
from hf_scratchgpt.finetuning import FinetuningArguments, load_pretrained, merge_adapters, select_trainable
from hf_scratchgpt.recipe import RecipeArguments, parse_recipe_args

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "classify.py"

spec = importlib.util.spec_from_file_location("classify_recipe", RECIPE)
classify = importlib.util.module_from_spec(spec)
spec.loader.exec_module(classify)


@pytest.fixture(scope="module")
def spam_file(shared_data) -> Path:
    return shared_data / "sms_spam" / "SMSSpamCollection.tsv"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, gpt2) -> Path:
    """A small pretrained-to-be ScratchGPT with GPT-2's tokenizer, saved as recipes/pretrain.py saves one."""
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    config = ScratchGPTConfig.from_preset(
        "tiny", vocab_size=50257, context_length=128, bos_token_id=50256, eos_token_id=50256, drop_rate=0.0
    )
    ScratchGPTForCausalLM(config).save_pretrained(folder)
    gpt2.save_pretrained(folder)
    return folder


def run_args(model, data, out, *extra) -> list[str]:
    return [
        "--config", str(classify.BOOK_CONFIG),  # the book's settings, which these tests were written for
        "--model_name_or_path", str(model), "--data_file", str(data), "--output_dir", str(out),
        "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64", "--max_length", "64",
        "--logging_steps", "2", "--report_to", "none", "--disable_tqdm", "true", *extra,
    ]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return ScratchGPTForSequenceClassification.from_pretrained(folder).state_dict()


@pytest.mark.slow
def test_last_block_run_saves_a_classifier_that_loads_everywhere(base_model, spam_file, tmp_path):
    out = tmp_path / "last-block"
    metrics = classify.main(run_args(base_model, spam_file, out, "--max_steps", "3", "--eval_steps", "3",
                                     "--save_steps", "3", "--learning_rate", "1e-3"))
    assert json.loads((out / "eval_results.json").read_text())["test_accuracy"] == metrics["test_accuracy"]
    # The reported accuracy is the saved model's on the book's 300 test messages, recomputed here.
    tokenizer = AutoTokenizer.from_pretrained(out)
    test = sms_spam_splits(load_sms_spam(spam_file), seed=123)["test"]
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = tokenizer(list(test["text"]), padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1)
    assert len(test) == 300
    assert metrics["test_accuracy"] == pytest.approx((predictions == torch.tensor(list(test["label"]))).float().mean().item())

    base, tuned = weights(base_model), weights(out)
    unchanged = ["model.tok_emb.weight", "model.pos_emb.weight", "model.trf_blocks.0.att.qkv.weight"]
    changed = ["model.trf_blocks.1.att.qkv.weight", "model.final_norm.weight"]  # the last block and final norm
    for name in unchanged:
        assert torch.equal(tuned[name], base[name]), name
    for name in changed:
        assert not torch.equal(tuned[name], base[name]), name

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "ham", 1: "spam"}
    labels = pipeline("text-classification", model=str(out))(["Free entry! Call now to claim your prize", "ok see u"])
    assert {result["label"] for result in labels} <= {"ham", "spam"}
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "README.md").read_text()
    assert 'pipeline_tag: "text-classification"' in card and "AutoModelForSequenceClassification" in card


@pytest.mark.slow
def test_a_small_model_learns_spam_in_one_epoch(base_model, spam_file, tmp_path):
    metrics = classify.main(run_args(base_model, spam_file, tmp_path / "all", "--trainable", "all",
                                     "--num_train_epochs", "1", "--learning_rate", "2e-3",
                                     "--eval_strategy", "no", "--save_strategy", "no"))
    assert metrics["test_accuracy"] > 0.85  # 50% by chance on the balanced split; ~96% after two epochs


@pytest.mark.slow
def test_same_seed_gives_the_same_new_head(base_model, spam_file, tmp_path):
    def head(seed: str) -> torch.Tensor:
        out = tmp_path / f"seed-{seed}-{len(list(tmp_path.iterdir()))}"  # learning rate 0: the head as it started
        classify.main(run_args(base_model, spam_file, out, "--seed", seed, "--max_steps", "1", "--learning_rate", "0",
                               "--eval_strategy", "no", "--save_strategy", "no"))
        return weights(out)["score.weight"]

    first, again, other = head("5"), head("5"), head("6")
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.slow
def test_lora_run_saves_the_adapters_merged(base_model, spam_file, tmp_path):
    out = tmp_path / "lora"
    classify.main(run_args(base_model, spam_file, out, "--trainable", "lora", "--lora_r", "4", "--max_steps", "3",
                           "--learning_rate", "1e-2", "--eval_strategy", "no", "--save_strategy", "no"))
    assert not (out / "adapter_config.json").exists()  # an ordinary model: the adapters are in the weights
    base, tuned = weights(base_model), weights(out)
    assert not any("lora" in name for name in tuned)
    for name in ["model.tok_emb.weight", "model.trf_blocks.0.norm1.weight", "model.final_norm.bias"]:
        assert torch.equal(tuned[name], base[name]), name  # frozen, no adapter
    for name in ["model.trf_blocks.0.att.qkv.weight", "model.trf_blocks.1.ff.fc2.weight"]:
        assert not torch.equal(tuned[name], base[name]), name  # W + alpha / r * B A


def test_lora_trains_adapters_and_the_new_head_only(base_model):
    model = load_pretrained(ScratchGPTForSequenceClassification, str(base_model), num_labels=2)
    model = select_trainable(model, FinetuningArguments(model_name_or_path=str(base_model), trainable="lora"))
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trained and all("lora_" in name or ".score." in name for name in trained)
    assert sum(".score." in name for name in trained) == 2  # the head's weight and bias, trained whole
    assert sum("lora_A" in name for name in trained) == 4 * 2  # qkv, out_proj, fc1, fc2 in each of 2 blocks


def test_starts_from_a_gpt2_checkpoint(gpt2, tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    gpt2.save_pretrained(tmp_path / "gpt2")
    start = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    model = load_pretrained(ScratchGPTForSequenceClassification, str(tmp_path / "gpt2"), num_labels=2)
    assert isinstance(model, ScratchGPTForSequenceClassification) and model.config.num_labels == 2
    # GPT-2's Conv1D stores the qkv projection transposed.
    torch.testing.assert_close(model.model.trf_blocks[0].att.qkv.weight, start.transformer.h[0].attn.c_attn.weight.T)
    torch.testing.assert_close(model.model.tok_emb.weight, start.transformer.wte.weight)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--trainable", "everything"], r"--trainable 'everything': expected one of last_block, all, lora"),
        (["--model_name_or_path", "./no-model"], r"--model_name_or_path ./no-model: no such file or folder"),
        (["--data_file", "missing.tsv"], r"--data_file missing.tsv: no such file or folder"),
        (["--max_length", "4096"], r"max_length 4096 is longer than the model's context_length of 128"),
        (["--soften_attention", "2"], r"--soften_attention must be in \[0, 1\], got 2.0"),
    ],
)
def test_bad_input_raises_before_training(base_model, spam_file, tmp_path, flags, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        classify.main([*run_args(base_model, spam_file, tmp_path / "out"), *flags])
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.slow
def test_a_bad_line_in_the_data_is_one_line_on_the_command_line(base_model, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("ham\tfine\nmaybe\tnot a label\n")
    result = subprocess.run(
        [sys.executable, str(RECIPE), *run_args(base_model, bad, tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}, line 2: expected 'ham<TAB>text' or 'spam<TAB>text', got 'maybe\\tnot a label\\n'"
    ]


# ----------------------------------------------------------------------------------------------------------
# Any labelled texts: columns, labels, metrics, LoRA, several processes, bad input

TOPICS = {
    "sport": ["the match ended with a late goal", "our team won the cup final", "the striker scored twice"],
    "food": ["the soup needs more salt", "fresh bread and butter for breakfast", "the cake was too sweet"],
    "weather": ["rain all day and cold wind", "sunny skies tomorrow afternoon", "snow is expected tonight"],
}


def topic_rows(count: int, long_every: int = 0) -> list[tuple[str, str]]:
    """(text, topic) rows, all texts different; every `long_every`-th text is longer than a 128-token context."""
    rows = []
    for i in range(count):
        topic = list(TOPICS)[i % 3]
        text = f"{TOPICS[topic][i // 3 % 3]}, note {i}"
        if long_every and i % long_every == 0:
            text = " ".join([text] * 30)
        rows.append((text, topic))
    return rows


def write_csv(path: Path, rows, header=("id", "message", "topic")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows((i, *row) for i, row in enumerate(rows))
    return path


def file_args(model, out, *extra) -> list[str]:
    return [
        "--config", str(classify.BOOK_CONFIG), "--model_name_or_path", str(model), "--output_dir", str(out),
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
        "--eval_strategy", "no", "--save_strategy", "no", *extra,
    ]


@pytest.mark.slow
def test_three_class_csv_with_named_columns_trains_saves_and_answers_with_the_names(base_model, tmp_path):
    data = write_csv(tmp_path / "topics.csv", topic_rows(60, long_every=7))
    out = tmp_path / "topics"
    with pytest.warns(UserWarning, match=r"\d+ of 42 train, .* texts are longer than 128 tokens and were cut"):
        metrics = classify.main(file_args(base_model, out, "--train_file", str(data), "--text_column", "message",
                                          "--label_column", "topic", "--max_steps", "3", "--learning_rate", "1e-3"))
    names = ["food", "sport", "weather"]
    assert AutoModelForSequenceClassification.from_pretrained(out).config.id2label == dict(enumerate(names))
    answers = pipeline("text-classification", model=str(out), top_k=None)(["rain and wind", "a goal " * 200],
                                                                           truncation=True)
    assert [sorted(entry["label"] for entry in answer) for answer in answers] == [names, names]
    # Every metric, macro and per class, in metrics.json, with the confusion matrix of the 12 test texts.
    saved = json.loads((out / "metrics.json").read_text())
    for name in ("test_accuracy", "test_precision", "test_recall", "test_f1", "eval_f1", *(f"test_{m}_{n}" for m in
                 ("precision", "recall", "f1") for n in names)):
        assert saved[name] == pytest.approx(metrics[name]), name
    matrix = saved["test_confusion_matrix"]
    assert saved["labels"] == names and len(matrix) == 3 and sum(map(sum, matrix)) == 12
    assert saved["test_accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(3)) / 12)
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "README.md").read_text()
    assert "## Test confusion matrix" in card and "| test_f1_weather |" in card
    assert AutoTokenizer.from_pretrained(out).model_max_length == 128  # cut where training cut


@pytest.mark.slow
def test_json_lines_with_integer_labels_and_given_names(base_model, tmp_path):
    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"sentence": text, "stars": list(TOPICS).index(topic)}) + "\n"
                                for text, topic in rows))
        return str(path)

    rows = topic_rows(48)
    out = tmp_path / "jsonl"
    metrics = classify.main(file_args(
        base_model, out, "--train_file", write("train.jsonl", rows[:30]), "--validation_file",
        write("validation.jsonl", rows[30:39]), "--test_file", write("test.jsonl", rows[39:]), "--text_column",
        "sentence", "--label_column", "stars", "--class_names", "one", "two", "three", "--max_steps", "2"))
    assert metrics["test_samples_per_second"] > 0 and "test_f1_three" in metrics and "eval_f1_one" in metrics
    answers = pipeline("text-classification", model=str(out), top_k=None)(["fresh bread"])[0]
    assert sorted(entry["label"] for entry in answers) == ["one", "three", "two"]
    assert json.loads((out / "metrics.json").read_text())["labels"] == ["one", "two", "three"]


def test_lora_merged_and_reloaded_gives_the_logits_of_the_model_with_adapters(base_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    tokenizer.pad_token = tokenizer.eos_token
    model = load_pretrained(ScratchGPTForSequenceClassification, str(base_model), num_labels=3,
                            pad_token_id=tokenizer.pad_token_id)
    model = select_trainable(model, FinetuningArguments(model_name_or_path=str(base_model), trainable="lora",
                                                        lora_r=4, lora_alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():  # as if trained: every adapter (B starts at 0) and the head move
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(0.05 * torch.randn_like(param))
    batch = tokenizer(["Free entry! Call now", "see you at five, bring the cake"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            without = model(**batch).logits
        before = model(**batch).logits
    trainer = SimpleNamespace(model=model, model_wrapped=model)
    merge_adapters(trainer)  # what the recipe does before saving
    trainer.model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name in reloaded.state_dict())
    with torch.no_grad():
        after = reloaded(**batch).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert (before - without).abs().max() > 1e-2  # the adapters changed the logits: the check can fail


# A recipe run under torchrun that records the token ids of every training example each process sees.
RECORDING_RUN = textwrap.dedent("""
    import importlib.util, json, os, sys
    spec = importlib.util.spec_from_file_location("classify_recipe", {recipe!r})
    classify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(classify)
    seen = []

    class RecordingTrainer(classify.ScratchGPTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
                seen.append([i for i, m in zip(ids, mask) if m])
            return super().training_step(model, inputs, *args, **kwargs)

    classify.ScratchGPTTrainer = RecordingTrainer
    classify.run_recipe(lambda: classify.main(sys.argv[1:]))
    with open(os.path.join({out!r}, f"seen-{{os.environ['RANK']}}.json"), "w") as file:
        json.dump(seen, file)
""")


@pytest.mark.slow
def test_two_processes_run_the_recipe_and_see_different_examples(base_model, tmp_path):
    data = write_csv(tmp_path / "topics.csv", topic_rows(60))
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "recording_run.py"
    script.write_text(RECORDING_RUN.format(recipe=str(RECIPE), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         *file_args(base_model, out, "--train_file", str(data), "--text_column", "message", "--label_column",
                    "topic", "--per_device_train_batch_size", "4", "--max_steps", "2")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of world size 2" in result.stdout and "process 1 of world size 2" in result.stdout
    seen = [json.loads((out / f"seen-{rank}.json").read_text()) for rank in (0, 1)]
    assert [len(rank) for rank in seen] == [2 * 4, 2 * 4]  # 2 steps of 4 examples on each process
    first, second = ({tuple(ids) for ids in rank} for rank in seen)
    assert len(first) == len(second) == 8 and first.isdisjoint(second)  # 16 different training texts in all
    assert json.loads((out / "metrics.json").read_text())["labels"] == ["food", "sport", "weather"]


COLUMNS = ["--text_column", "message", "--label_column", "topic"]


@pytest.mark.parametrize(
    "rows, flags, message",
    [
        ([("a", "x")] * 12, COLUMNS, r"the labels have one class \('x'\); a classifier needs at least 2"),
        ([("a", "x"), ("b", ""), ("c", "y"), ("d", "")] * 3, COLUMNS, r"rows 2, 4, 6, .* without a label"),
        (topic_rows(12), ["--text_column", "body", "--label_column", "topic"],
         r"--text_column 'body' is not a column of .*topics.csv; its columns: id, message, topic"),
        (topic_rows(12), ["--text_column", "message", "--label_column", "class"],
         r"--label_column 'class' is not a column of .*; its columns: id, message, topic"),
        (topic_rows(12), [*COLUMNS, "--test_file", "{test}"],
         r"test.csv: label 'music' \(row 1 .*\) never appears in the training data, which has food, sport, weather"),
        (topic_rows(12), [*COLUMNS, "--validation_file", "{test}"], r"label 'music' .* never appears in the training"),
        (topic_rows(8), [*COLUMNS, "--per_device_train_batch_size", "2"],
         r"the validation split has no texts: use more data, or give --validation_file"),
        (topic_rows(8), COLUMNS,
         r"the training data gives 6 texts, fewer than one batch of 8: use more data or a smaller "
         r"--per_device_train_batch_size"),
    ],
)
def test_bad_data_is_one_line_before_training(base_model, tmp_path, rows, flags, message):
    data = write_csv(tmp_path / "topics.csv", rows)
    test = write_csv(tmp_path / "test.csv", [("a new song", "music"), ("a goal", "sport")])
    flags = [flag.format(test=test) for flag in flags]
    with pytest.raises(ValueError, match=message) as error:
        classify.main(file_args(base_model, tmp_path / "out", "--train_file", str(data), *flags))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing trained, nothing saved


def test_without_config_the_model_chooses_the_settings(base_model, tmp_path):
    wide = tmp_path / "wide"
    ScratchGPTConfig.from_preset("gpt2-small").save_pretrained(wide)  # only its config.json is read
    assert classify.default_config(["--model_name_or_path", str(wide)]) == classify.BOOK_CONFIG
    assert classify.default_config([f"--model_name_or_path={base_model}"]) == classify.SMALL_CONFIG  # 32 wide
    assert classify.default_config(["--data_file", "x.tsv"]) == classify.SMALL_CONFIG  # runs/pretrain-default
    assert classify.default_config(["--model_name_or_path", str(wide), "--config", "mine.yaml"]) is None
    assert classify.default_config(["--model_name_or_path", "./missing"]) == classify.BOOK_CONFIG  # errors later
    # Every shipped config parses (no unknown key) and keeps the book's seeds; the small model's names the main job's.
    for config in sorted(classify.CONFIGS.glob("*.yaml")):
        model, data, _, _, training = parse_recipe_args(
            (FinetuningArguments, classify.DataArguments, classify.ClassifierArguments, RecipeArguments,
             TrainingArguments),
            ["--config", str(config), "--data_file", "SMSSpamCollection.tsv"],
        )
        assert training.seed == data.split_seed == 123, config
        assert (model.model_name_or_path == "runs/pretrain-default") == config.stem.startswith("scratchgpt"), config
