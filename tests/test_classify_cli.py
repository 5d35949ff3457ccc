"""Tests of hf_scratchgpt/classify.py: the book's classify_review for many texts, and `scratchgpt-classify`."""

import subprocess
import sys

import pytest
import torch

from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM, ScratchGPTForSequenceClassification
from hf_scratchgpt.classify import (
    ClassificationMetrics,
    classify_texts,
    confusion_table,
    main,
    plot_confusion_matrix,
    soften_attention,
)
from hf_scratchgpt.data import default_corpus
from hf_scratchgpt.tokenization import train_bpe_tokenizer

LABELS = ["food", "sport", "weather"]
TEXTS = ["The soup needs more salt.", "A late goal won the match for the visitors in the rain", "Sunny"]


@pytest.fixture(scope="module")
def saved_classifier(tmp_path_factory):
    """A small 3-class ScratchGPT classifier saved as recipes/classify.py saves one: names in the config, and the
    training length (16 tokens) as the tokenizer's model_max_length."""
    folder = tmp_path_factory.mktemp("classifier")
    tokenizer = train_bpe_tokenizer(default_corpus()[:5], vocab_size=300)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = 16
    torch.manual_seed(0)
    config = ScratchGPTConfig.from_preset(
        "tiny", vocab_size=len(tokenizer), num_labels=3, id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)}, pad_token_id=tokenizer.pad_token_id,
    )
    ScratchGPTForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def one_by_one(folder, texts, max_length=16):
    """The book's classify_review, text by text: ids cut to max_length, no padding, arg-max of the last token."""
    from transformers import AutoTokenizer

    model = ScratchGPTForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    results = []
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text)[:max_length]])
        with torch.no_grad():
            probabilities = model(ids).logits[0].softmax(-1)
        results.append((LABELS[int(probabilities.argmax())], float(probabilities.max())))
    return results


def test_batched_texts_get_the_label_and_score_of_each_alone(saved_classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(saved_classifier)
    tokenizer = AutoTokenizer.from_pretrained(saved_classifier)
    long_text = " ".join(["weather"] * 200)  # far past the 16 training tokens and the context of 64: cut, no crash
    texts = [*TEXTS, long_text]
    batched = classify_texts(model, tokenizer, texts, batch_size=3)
    expected = one_by_one(saved_classifier, texts)
    assert [label for label, _ in batched] == [label for label, _ in expected]
    assert [score for _, score in batched] == pytest.approx([score for _, score in expected], abs=1e-5)
    assert all(label in LABELS and 1 / 3 <= score <= 1 for label, score in batched)


def test_command_prints_a_label_per_text(saved_classifier, tmp_path, capsys):
    lines_file = tmp_path / "texts.txt"
    lines_file.write_text(f"{TEXTS[0]}\n\n{TEXTS[1]}\n")  # the blank line is no text
    main([str(saved_classifier), TEXTS[2], "--file", str(lines_file)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    expected = one_by_one(saved_classifier, [TEXTS[2], TEXTS[0], TEXTS[1]])
    for line, text, (label, score) in zip(lines, [TEXTS[2], TEXTS[0], TEXTS[1]], expected, strict=True):
        assert line == f"{label}\t{score:.4f}\t{text}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{folder}/missing", "a text"], "no model folder"),
        (["{folder}", "--file", "{folder}/nothing.txt"], "cannot read --file"),
        (["{folder}", ""], "an empty text cannot be classified"),
        (["{folder}", "--file", "{folder}/latin-1.txt"], r"latin-1.txt is not UTF-8 text \(.*byte 0xe9\)"),
        (["{folder}/language-model", "a text"], "language-model holds a language model, not a classifier"),
    ],
)
def test_command_errors_are_one_line(saved_classifier, argv, message):
    (saved_classifier / "latin-1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    language_model = saved_classifier / "language-model"
    if not language_model.exists():  # the classifier's own body and tokenizer, saved as a language model
        ScratchGPTForCausalLM(ScratchGPTConfig.from_pretrained(saved_classifier)).save_pretrained(language_model)
    with pytest.raises(SystemExit, match=message) as error:
        main([arg.format(folder=saved_classifier) for arg in argv])
    assert "\n" not in str(error.value)


def test_command_needs_texts(saved_classifier, capsys):
    with pytest.raises(SystemExit):
        main([str(saved_classifier)])
    assert "give texts to classify" in capsys.readouterr().err


@pytest.mark.slow
def test_installed_command_runs_as_a_module(saved_classifier):
    result = subprocess.run([sys.executable, "-m", "hf_scratchgpt.classify", str(saved_classifier), *TEXTS],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [l for l, _ in one_by_one(
        saved_classifier, TEXTS)]


def test_metrics_of_a_trainer_prediction_per_class_and_the_confusion_matrix():
    from transformers import EvalPrediction

    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1, 2, 0, 2, 2]), 3).float().numpy()
    scorer = ClassificationMetrics(["a", "b", "c"])
    result = scorer(EvalPrediction(predictions=logits, label_ids=[0, 1, 2, 0, 1, 0, 0, 2]))
    # The hand counts of tests/test_metrics.py: per-class F1 2/3, 1/2, 2/3.
    assert result["accuracy"] == pytest.approx(5 / 8)
    assert [result["f1_a"], result["f1_b"], result["f1_c"]] == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert result["f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert result["precision_c"] == pytest.approx(2 / 4) and result["recall_a"] == pytest.approx(2 / 4)
    assert scorer.confusion_matrix == [[2, 1, 1], [0, 1, 1], [0, 0, 2]]
    assert confusion_table(scorer.confusion_matrix, scorer.labels).splitlines()[2:] == [
        "| a | 2 | 1 | 1 |", "| b | 0 | 1 | 1 |", "| c | 0 | 0 | 2 |"]


def test_confusion_matrix_plot_is_a_png(tmp_path):
    path = plot_confusion_matrix([[5, 1], [0, 7]], ["ham", "spam"], tmp_path / "confusion_matrix.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_softened_attention_scales_queries_and_keys_and_at_zero_attends_evenly():
    torch.manual_seed(0)
    config = ScratchGPTConfig.from_preset("tiny", num_labels=2, attn_implementation="eager", drop_rate=0.0)
    model = ScratchGPTForSequenceClassification(config).eval()
    before = model.model.trf_blocks[0].att.qkv.weight.clone()
    soften_attention(model, 0.5)
    after = model.model.trf_blocks[0].att.qkv.weight
    width = config.emb_dim
    torch.testing.assert_close(after[: 2 * width], 0.5 * before[: 2 * width])  # queries and keys
    torch.testing.assert_close(after[2 * width :], before[2 * width :])  # values untouched
    ids = torch.randint(0, config.vocab_size, (2, 7))
    sharp = model(ids, output_attentions=True).attentions[0]
    soften_attention(model, 0.0)
    even = model(ids, output_attentions=True).attentions[0]  # (B, nh, T, T)
    expected = torch.tril(torch.ones(7, 7)) / torch.arange(1, 8).unsqueeze(1)  # row i: 1 / (i + 1) on its prefix
    torch.testing.assert_close(even, expected.expand_as(even))
    assert not torch.allclose(sharp, expected.expand_as(sharp), atol=1e-3)  # before, it was not even
    with pytest.raises(ValueError, match=r"--soften_attention must be in \[0, 1\], got 2"):
        soften_attention(model, 2)
