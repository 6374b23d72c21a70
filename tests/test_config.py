"""Config loading and validation: overrides, the TrainingArguments schema read without importing
transformers, torch-free method params, data size planning. Bad inputs through the CLI are in
tests/test_cli_errors.py."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import typing
from pathlib import Path

import pytest
import yaml

from llmkd.training.config import check_config, config_from_dict, config_help, load_config
from llmkd.training.schema import training_args_schema
from llmkd.yaml_reader import read_yaml_mapping
from llmkd.training.outdir import MARKER
from llmkd.validation import type_ok


def base(tiny_pair, out: Path) -> dict:
    return {"output_dir": str(out), "use_cpu": True, "max_steps": 1, "save_strategy": "no",
            "model": {"teacher": tiny_pair[0], "student": tiny_pair[1]},
            "data": {"recipe": "arithmetic", "num_train": 8, "num_eval": 4},
            "method": {"name": "token_kd", "kind": "jsd", "beta": 0.5}}


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def fake_checkpoint(out: Path, step: int, weights_from: str) -> Path:
    """A directory the Trainer could resume from: trainer state + complete safetensors, in an
    output_dir marked as an llmkd run's."""
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (out / MARKER).write_text("{}")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    shutil.copy(Path(weights_from) / "model.safetensors", ckpt / "model.safetensors")
    return ckpt


def test_yaml_sections_overrides_and_training_args(tiny_pair, tmp_path):
    raw = base(tiny_pair, tmp_path / "out")
    raw["learning_rate"] = "1e-4"          # YAML 1.1 reads this as a string; accepted as float
    raw["gradient_accumulation_steps"] = 2
    cfg = load_config(write(tmp_path, raw), ["method.beta=0.25", "data.num_train=16", "seed=7"])
    assert cfg.learning_rate == 1e-4 and cfg.gradient_accumulation_steps == 2 and cfg.seed == 7
    assert cfg.method.params["beta"] == 0.25 and cfg.data.num_train == 16
    assert cfg.to_dict()["model"]["teacher"] == tiny_pair[0]
    assert not (tmp_path / "out").exists()


def test_schema_read_from_source_matches_training_arguments():
    """The ast reading of transformers' source gives TrainingArguments' init fields, types that
    accept and reject the same YAML values, and the enum choices TrainingArguments enforces."""
    from transformers import TrainingArguments
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType
    from transformers.training_args import OptimizerNames

    types, choices = training_args_schema()
    hints = typing.get_type_hints(TrainingArguments)
    real = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    assert set(types) == real
    for name in real - {"parallelism_config"}:   # an accelerate class: accepted as anything here
        for value in (1, 1.5, "x", True, None, [1], {"a": 1}):
            assert type_ok(value, types[name]) == type_ok(value, hints[name]), (name, value)
    assert set(choices["lr_scheduler_type"]) == {e.value for e in SchedulerType}
    assert set(choices["optim"]) == {e.value for e in OptimizerNames}
    assert set(choices["save_strategy"]) == {e.value for e in SaveStrategy}
    assert set(choices["eval_strategy"]) == {e.value for e in IntervalStrategy}


def test_validation_imports_no_model_library(tiny_pair, tmp_path):
    """check_config (what every CLI config error goes through) never imports torch."""
    import subprocess
    import sys

    raw = base(tiny_pair, tmp_path / "out")
    code = ("import json, sys; from llmkd.training.config import check_config; "
            f"check_config(json.loads({json.dumps(json.dumps(raw))})); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_method_params_are_the_methods_own():
    from llmkd.methods import METHODS, PARAMS, get_method, get_params

    for name in PARAMS:
        assert name in METHODS and get_params(name) is get_method(name).Params, name


def test_help_lists_sections_and_method_params():
    text = config_help()
    for key in ("model:", "data:", "allow_fewer", "token_kd:", "beta=0.5", "rationale:", "alpha=0.5",
                "overwrite_output_dir", "resume_from_checkpoint"):
        assert key in text, key


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("learning_rate: 1.0e-4\nmax_steps: 3\nlearning_rate: 1.0e-3\n")
    with pytest.raises(ValueError, match=r"line 3, column 1: duplicate key 'learning_rate' \(first set on line 1\)"):
        read_yaml_mapping(path)


def test_resume_true_takes_a_complete_checkpoint(tiny_pair, tmp_path):
    out = tmp_path / "out"
    raw = {**base(tiny_pair, out), "resume_from_checkpoint": True, "save_strategy": False}
    with pytest.raises(FileNotFoundError, match="has no complete checkpoint"):
        check_config(raw)
    (out / "checkpoint-4").mkdir(parents=True)                      # incomplete: no state, no weights
    with pytest.raises(FileNotFoundError, match=r"skipped incomplete .*checkpoint-4 \(no trainer_state.json\)"):
        check_config(raw)
    fake_checkpoint(out, 2, tiny_pair[1])
    cfg = config_from_dict(raw)
    assert cfg.resume_from_checkpoint is True and cfg.save_strategy == "no"


def test_non_empty_output_dir_names_the_resume_and_overwrite_commands(tiny_pair, tmp_path):
    out = tmp_path / "out"
    fake_checkpoint(out, 2, tiny_pair[1])
    with pytest.raises(FileExistsError, match="--set resume_from_checkpoint=true.*--set overwrite_output_dir=true"):
        check_config(base(tiny_pair, out))
    assert config_from_dict({**base(tiny_pair, out), "overwrite_output_dir": True}).overwrite_output_dir


def test_plan_split_says_what_exists_and_allows_fewer(capsys):
    from llmkd.data.recipes import plan_split

    assert plan_split(40, 32, 8, allow_fewer=False, source="x") == (32, 8)
    with pytest.raises(ValueError, match=r"x has 32 rows but data.num_train=256 \+ data.num_eval=32 = 288 "
                                         r"were asked.*data.allow_fewer=true to train on 26 and hold out 6"):
        plan_split(32, 256, 32, allow_fewer=False, source="x")
    assert plan_split(32, 256, 32, allow_fewer=True, source="x") == (26, 6)
    assert "training on 26 and holding out 6" in capsys.readouterr().err
    assert plan_split(32, 256, 4, allow_fewer=True, source="x") == (28, 4)   # num_eval is kept


def test_recipe_split_of_a_small_local_file(tmp_path):
    from llmkd.data.recipes import load_recipe

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(10)))
    recipe = load_recipe("arithmetic", path=str(data))
    with pytest.raises(ValueError, match="has 10 rows but data.num_train=16"):
        recipe.load_split(16, 4)
    train, held = recipe.load_split(16, 4, allow_fewer=True)
    assert (len(train), len(held)) == (8, 2) and not set(train["prompt"]) & set(held["prompt"])


def test_offline_teacher_cannot_score_new_samples(tiny_pair):
    from llmkd.methods.params import TokenKDParams
    from llmkd.methods.token_kd import TokenKD
    from llmkd.models.student import load_causal_lm

    with pytest.raises(ValueError, match="teacher_mode=live"):
        TokenKD(TokenKDParams(lmbda=0.5)).attach(None, load_causal_lm(tiny_pair[1]), chunked_head_ok=True)


def test_set_indexes_into_lists():
    """`--set data.mixture.1.teacher=x` edits one source of a mixture (a list in the YAML)."""
    from llmkd.yaml_reader import apply_overrides

    raw = {"data": {"mixture": [{"recipe": "a", "teacher": "m"}, {"recipe": "b", "teacher": "m"}]}}
    apply_overrides(raw, ["data.mixture.1.teacher=logic", "data.mixture.0.num_train=4"])
    assert raw["data"]["mixture"] == [{"recipe": "a", "teacher": "m", "num_train": 4},
                                      {"recipe": "b", "teacher": "logic"}]
    for bad, says in (("data.mixture.2.teacher=x", "data.mixture has 2 entries (0 to 1)"),
                      ("data.mixture.first.teacher=x", "data.mixture is a list: index it")):
        with pytest.raises(ValueError, match=re.escape(says)):
            apply_overrides(raw, [bad])
