"""transformers' own generic model tests (`ModelTesterMixin`, `ConfigTester`, `PipelineTesterMixin`) run on ScratchGPT.

The test mixins are not in the transformers wheel; the source distribution on PyPI ships the top-level common modules
of its `tests/` folder, but not the folders they import from (`tests/generation`, `tests/exporters`, `tests/utils`,
`tests/pipelines`). This module loads the sdist's `tests/` folder from `TRANSFORMERS_TESTS_DIR` (`.ci/run` downloads
and unpacks it) as a package of its own name, and stands in for the missing modules:

- `generation/test_utils.py` (`GenerationTesterMixin`): an empty mixin, so no generic `generate` tests run
  (test_generate.py and test_modeling.py test ScratchGPT's generation). A full checkout's `tests/` folder (the git
  tag of the installed version) given as `TRANSFORMERS_TESTS_DIR` runs the real ones.
- `exporters/test_export.py` (`ExportTesterMixin`, a base of `ModelTesterMixin`): empty; test_modeling.py tests
  `torch.export` and `torch.compile(fullgraph=True)` with a `StaticCache`.
- `utils/test_configuration_utils.py`: `config_common_kwargs`, a non-default value for each `PreTrainedConfig` field.
- `utils/tiny_model_summary.json`: empty; the pipeline tests load tiny models from the Hub (`hf-internal-testing`,
  which has no ScratchGPT, and CI reaches no Hub) and their test classes live in `tests/pipelines`: they skip.

Without the folder the module is skipped, except on CI (CI=true), where that is a failure.
"""

import importlib
import importlib.util
import os
import sys
import tempfile
import types
import unittest
from pathlib import Path
from unittest import mock

import pytest
import transformers
from transformers.models.auto import modeling_auto

from hf_scratchgpt import (
    ScratchGPTConfig,
    ScratchGPTForCausalLM,
    ScratchGPTForSequenceClassification,
    ScratchGPTModel,
)


TESTS_DIR = Path(
    os.environ.get("TRANSFORMERS_TESTS_DIR")
    or Path(tempfile.gettempdir()) / f"transformers-{transformers.__version__}" / "tests"
)
PACKAGE = "transformers_common_tests"  # not `tests`: this repository's own folder has that name


def _missing(message: str):
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


if not (TESTS_DIR / "test_modeling_common.py").is_file():
    _missing(
        f"transformers' test modules not found in {TESTS_DIR} (set TRANSFORMERS_TESTS_DIR to the tests/ folder of "
        f"the transformers {transformers.__version__} source distribution; .ci/run shows how to get it)"
    )
try:
    import parameterized  # noqa: F401  (imported by test_modeling_common)
except ImportError:
    _missing("the package `parameterized`, which transformers' test modules import, is not installed")


class _ExportTesterMixin:
    """Stand-in for tests/exporters/test_export.py, which the sdist lacks."""


class _GenerationTesterMixin:
    """Stand-in for tests/generation/test_utils.py, which the sdist lacks."""


# A non-default value for every field of `PreTrainedConfig` (as transformers' tests/utils/test_configuration_utils.py).
_CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}


def _stub(name: str, **attributes) -> None:
    if importlib.util.find_spec(name) is None:
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module


def _load_common_tests() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(TESTS_DIR)]
    sys.modules[PACKAGE] = package
    for folder in ("exporters", "generation", "utils"):
        if not (TESTS_DIR / folder).is_dir():
            sys.modules[f"{PACKAGE}.{folder}"] = types.ModuleType(f"{PACKAGE}.{folder}")
            sys.modules[f"{PACKAGE}.{folder}"].__path__ = []
    _stub(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=_ExportTesterMixin)
    _stub(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=_GenerationTesterMixin)
    _stub(f"{PACKAGE}.utils.test_configuration_utils", config_common_kwargs=_CONFIG_COMMON_KWARGS)

    summary = TESTS_DIR / "utils" / "tiny_model_summary.json"
    tiny_models = os.environ.get("TRANSFORMERS_TINY_MODEL_PATH", "hf-internal-testing")
    with tempfile.TemporaryDirectory() as empty, mock.patch.dict(os.environ), mock.patch(
        # Both modules exec a transformers source tree's __init__ as `transformers`: use the installed one.
        "transformers.utils.direct_transformers_import", lambda *args, **kwargs: transformers
    ):
        if tiny_models == "hf-internal-testing" and not summary.is_file():
            (Path(empty) / "reports").mkdir()
            (Path(empty) / "reports" / "tiny_model_summary.json").write_text("{}")
            os.environ["TRANSFORMERS_TINY_MODEL_PATH"] = empty
        return tuple(
            importlib.import_module(f"{PACKAGE}.{name}")
            for name in ("test_modeling_common", "test_configuration_common", "test_pipeline_mixin")
        )


_modeling_common, _configuration_common, _pipeline_mixin = _load_common_tests()
ModelTesterMixin = _modeling_common.ModelTesterMixin
GenerationTesterMixin = _modeling_common.GenerationTesterMixin
ids_tensor, random_attention_mask = _modeling_common.ids_tensor, _modeling_common.random_attention_mask
ConfigTester = _configuration_common.ConfigTester
PipelineTesterMixin = _pipeline_mixin.PipelineTesterMixin

# The generic tests pick labels and skip bare models by class name from these tables of transformers' own models;
# `AutoModel.register` does not add to them.
_MAPPING_NAMES = {
    "MODEL_MAPPING_NAMES": "ScratchGPTModel",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "ScratchGPTForCausalLM",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "ScratchGPTForSequenceClassification",
}


class ScratchGPTModelTester:
    """A tiny ScratchGPT and its inputs, in the shape of transformers' `GPT2ModelTester`."""

    def __init__(
        self,
        parent,
        batch_size=13,
        seq_length=7,
        is_training=True,
        use_input_mask=True,
        use_labels=True,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_dropout_prob=0.1,
        max_position_embeddings=512,
        num_labels=3,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_dropout_prob = hidden_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.num_labels = num_labels
        self.bos_token_id = self.eos_token_id = self.pad_token_id = vocab_size - 1

    def get_config(self) -> ScratchGPTConfig:
        return ScratchGPTConfig(
            vocab_size=self.vocab_size,
            context_length=self.max_position_embeddings,
            emb_dim=self.hidden_size,
            n_layers=self.num_hidden_layers,
            n_heads=self.num_attention_heads,
            drop_rate=self.hidden_dropout_prob,
            qkv_bias=True,
            num_labels=self.num_labels,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = random_attention_mask([self.batch_size, self.seq_length]) if self.use_input_mask else None
        sequence_labels = ids_tensor([self.batch_size], self.num_labels) if self.use_labels else None
        return self.get_config(), input_ids, input_mask, sequence_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}


class ScratchGPTModelTest(ModelTesterMixin, GenerationTesterMixin, PipelineTesterMixin, unittest.TestCase):
    """transformers' generic tests. What they skip on this CPU, and why ScratchGPT lacks it:

    - accelerator, multiple accelerators, MPS, flash attention 2/3/4, `kernels`, deepspeed, timm, av, pytesseract:
      not on this machine (ScratchGPT declares flash and flex attention; a GPU run takes those tests).
    - pipelines, 38 tasks not in `pipeline_model_mapping`: audio, vision, masked-LM and token tasks; ScratchGPT is
      a decoder for text. The 8 of its own 4 tasks: the pipeline tests load `hf-internal-testing/tiny-random-<class>`
      from the Hub, which has no ScratchGPT, and their test classes are in tests/pipelines, not in the sdist.
    - RoPE (scaling, partial rotation, axial), sliding window, sparse experts (grouped_mm, router logits): learned
      absolute positions (`pos_emb`), full causal attention, a dense feed-forward network.
    - `resize_position_vector_embeddings`: `pos_emb` is fixed at `context_length`; no `resize_position_embeddings`.
    - composite models, sub-configs, seq2seq loss: one config, decoder only.
    - `_keep_in_fp32_modules*`: no module needs float32 under half precision (the softmax upcasts on its own).
    - tensor-parallel plan: none (`_tp_plan`); ScratchGPT is not meant for multi-GPU sharding.
    - `can_load_from_already_mapped_keys`, `reverse_loading_mapping`: no checkpoint key conversion registered with
      transformers; GPT-2 and book weights convert explicitly (`from_gpt2`, `from_book_state_dict`).
    - `bc_cache_name_forward`: the test wants exactly a `DynamicCache` back; ScratchGPT returns its `KVCache` (a
      subclass), and its classifier takes no cache. test_modeling.py checks `past_key_values=` instead.
    - `torch_compile_for_training`: `@slow` and needs an accelerator (RUN_SLOW=1 on a GPU runs it).
    """

    all_model_classes = (ScratchGPTModel, ScratchGPTForCausalLM, ScratchGPTForSequenceClassification)
    pipeline_model_mapping = {
        "feature-extraction": ScratchGPTModel,
        "text-classification": ScratchGPTForSequenceClassification,
        "text-generation": ScratchGPTForCausalLM,
        "zero-shot": ScratchGPTForSequenceClassification,
    }
    test_can_init_all_missing_weights_before_2023 = True  # else skipped: our files carry no "# Copyright 2023+"
    _torch_compile_train_cls = ScratchGPTForCausalLM

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        for table, class_name in _MAPPING_NAMES.items():  # for this class only: other tests see transformers' own
            patcher = mock.patch.dict(getattr(modeling_auto, table), {"scratchgpt": class_name})
            patcher.start()
            cls.addClassCleanup(patcher.stop)

    def setUp(self):
        self.model_tester = ScratchGPTModelTester(self)
        self.config_tester = ConfigTester(self, config_class=ScratchGPTConfig, emb_dim=36, n_heads=6)

    def test_config(self):
        self.config_tester.run_common_tests()
