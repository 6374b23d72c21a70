"""Config loading and bad input: each mistake gives one clear error and writes nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmkd.cli import main
from llmkd.config import config_from_dict, load_config


def base(tiny_pair, out: Path) -> dict:
    return {"output_dir": str(out), "use_cpu": True, "max_steps": 1, "save_strategy": "no",
            "model": {"teacher": tiny_pair[0], "student": tiny_pair[1]},
            "data": {"recipe": "arithmetic", "num_train": 8, "num_eval": 4},
            "method": {"name": "token_kd", "kind": "jsd", "beta": 0.5}}


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_yaml_sections_overrides_and_training_args(tiny_pair, tmp_path):
    raw = base(tiny_pair, tmp_path / "out")
    raw["learning_rate"] = "1e-4"          # YAML 1.1 reads this as a string; accepted as float
    raw["gradient_accumulation_steps"] = 2
    cfg = load_config(write(tmp_path, raw), ["method.beta=0.25", "data.num_train=16", "seed=7"])
    assert cfg.learning_rate == 1e-4 and cfg.gradient_accumulation_steps == 2 and cfg.seed == 7
    assert cfg.method.params["beta"] == 0.25 and cfg.data.num_train == 16
    assert cfg.to_dict()["model"]["teacher"] == tiny_pair[0]


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.__setitem__("learnig_rate", 1e-3), "did you mean 'learning_rate'"),
    (lambda r: r["model"].__setitem__("teachr", "x"), "did you mean 'teacher'"),
    (lambda r: r["method"].__setitem__("betta", 0.1), "did you mean 'beta'"),
    (lambda r: r["method"].__setitem__("beta", 1.5), "beta=1.5 is outside [0, 1]"),
    (lambda r: r["method"].__setitem__("temperature", 0), "temperature=0 must be > 0"),
    (lambda r: r["method"].__setitem__("name", "tokn_kd"), "Did you mean 'token_kd'"),
    (lambda r: r["data"].__setitem__("num_train", "many"), "data.num_train='many' has type str"),
    (lambda r: r["model"].__setitem__("teacher", "/no/such/model"), "model.teacher='/no/such/model' is not a model directory"),
    (lambda r: r["data"].__setitem__("recipe", "arithmetc"), "Did you mean 'arithmetic'"),
    (lambda r: r["model"].__setitem__("student_dtype", "bf16"), "model.student_dtype='bf16' is unknown"),
    (lambda r: r.__setitem__("method", "token_kd"), "method must be a mapping"),
    (lambda r: r.__setitem__("resume_from_checkpoint", "/no/ckpt"), "is not a checkpoint directory"),
])
def test_bad_config_fails_early_with_clear_error(tiny_pair, tmp_path, mutate, message, capsys):
    raw = base(tiny_pair, tmp_path / "out")
    mutate(raw)
    rc = main(["distill", str(write(tmp_path, raw))])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_dataset_without_needed_column(tiny_pair, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "1+1?", "solution": "2"}\n' * 8)
    raw = base(tiny_pair, tmp_path / "out")
    raw["data"] = {"recipe": "arithmetic", "path": str(data), "num_train": 4, "num_eval": 2}
    rc = main(["distill", str(write(tmp_path, raw))])
    err = capsys.readouterr().err
    assert rc == 2 and "lack ['answer']" in err, err
    assert not (tmp_path / "out").exists()


def test_vocab_mismatch_points_to_cross_tokenizer(tiny_pair, tmp_path, capsys):
    from llmkd.models.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=400)
    other = tmp_path / "other"
    tiny_model(tok).save_pretrained(other)
    tok.save_pretrained(other)
    raw = base(tiny_pair, tmp_path / "out")
    raw["model"]["student"] = str(other)
    rc = main(["distill", str(write(tmp_path, raw))])
    err = capsys.readouterr().err
    assert rc == 2 and "cross_tokenizer" in err and "vocab" in err, err
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_is_never_overwritten(tiny_pair, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    rc = main(["distill", str(write(tmp_path, base(tiny_pair, out)))])
    err = capsys.readouterr().err
    assert rc == 2 and "overwrite_output_dir" in err
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    cfg = config_from_dict({**base(tiny_pair, out), "overwrite_output_dir": True})
    assert cfg.overwrite_output_dir


def test_resume_true_means_last_checkpoint(tiny_pair, tmp_path):
    raw = {**base(tiny_pair, tmp_path / "out"), "resume_from_checkpoint": True, "save_strategy": False}
    cfg = config_from_dict(raw)
    assert cfg.resume_from_checkpoint is True and cfg.save_strategy == "no"


def test_offline_teacher_cannot_score_new_samples(tiny_pair, tmp_path):
    from llmkd.methods.token_kd import TokenKD, TokenKDParams

    with pytest.raises(ValueError, match="teacher_mode=live"):
        TokenKD(TokenKDParams(lmbda=0.5), teacher=None)
