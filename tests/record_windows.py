"""Run recipes/pretrain.py and record, for this process, the tokenizer it used and the windows it trained on.

    torchrun ... tests/record_windows.py RECORD_DIR [recipe flags...]

Writes RECORD_DIR/rank-<global rank>.json: {"rank", "tokenizer": sha256 of its definition, "windows": [[ids]...]}.
The tests of several processes and several machines read these files (tests/test_pretrain_recipe.py).
"""

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pretrain.py"


def main() -> None:
    record_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    spec = importlib.util.spec_from_file_location("pretrain_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)

    windows, tokenizers = [], []
    training_step, build_tokenizer = recipe.ScratchGPTTrainer.training_step, recipe.build_tokenizer

    def recording_step(self, model, inputs, *args, **kwargs):
        windows.extend(inputs["input_ids"].tolist())
        return training_step(self, model, inputs, *args, **kwargs)

    def recording_build_tokenizer(*args, **kwargs):
        tokenizer = build_tokenizer(*args, **kwargs)
        tokenizers.append(hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest())
        return tokenizer

    recipe.ScratchGPTTrainer.training_step = recording_step
    recipe.build_tokenizer = recording_build_tokenizer
    recipe.run_recipe(lambda: recipe.main(argv))
    rank = os.environ.get("RANK", "0")
    record = dict(rank=int(rank), tokenizer=tokenizers[0], windows=windows)
    (record_dir / f"rank-{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
