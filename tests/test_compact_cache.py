"""Compact top-k cache (`generate` config `cache: compact`, the default for new dirs): codec
fidelity against the exact values, the same rows as a lossless run after decoding, old dirs
unchanged and resumed as they were written, damaged blocks fail."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmkd.generation import codec
from llmkd.generation.run import GenerationConfig, run_generation
from llmkd.generation.writer import fingerprint, load_generated, read_manifest
from llmkd.losses import sparse_divergence
from helpers import offline_distill_error


def _bins(lp: np.ndarray) -> np.ndarray:
    """Top-k + tail log-masses as the sparse loss reads float32 values (tail floored at eps)."""
    lp = lp.astype(np.float32).astype(np.float64)
    tail = np.log(np.maximum(1 - np.exp(lp).sum(-1, keepdims=True), np.finfo(np.float32).eps))
    b = np.concatenate([lp, tail], -1)
    return b - np.logaddexp.reduce(b, -1, keepdims=True)


@pytest.mark.parametrize("vocab,k", [(300, 20), (70_000, 50)])
def test_codec_keeps_ids_and_stays_within_its_kl_budget(vocab, k):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, vocab, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 6, 64)[:, None]
    logp = logits.log_softmax(-1)
    top, ids = logp.topk(k, -1)
    top[3, -1] = -math.inf                           # a -inf log-prob must not break the block
    block = codec.encode_row(ids.tolist(), top.tolist(), width=codec.id_bytes(vocab))
    d_ids, d_lp, d_tail = codec.decode_row(*(block[c] for c in codec.COLUMNS))
    d_ids, d_lp = torch.tensor(d_ids), torch.tensor(d_lp, dtype=torch.float64)
    assert torch.equal(d_ids, ids.sort(-1).values)   # same ids, sorted by id
    exact = top.gather(-1, ids.argsort(-1))          # exact values in the decoded order
    e, d = _bins(exact.numpy()), _bins(d_lp.numpy())
    with np.errstate(invalid="ignore"):
        kl = np.where(np.isneginf(e), 0.0, np.exp(e) * (e - d)).sum(-1)
    assert kl.mean() <= 1e-4 and kl.max() <= 1e-3, (kl.mean(), kl.max())
    tail = (1 - exact.exp().sum(-1)).clamp(min=math.exp(codec.LOG_TAIL_MIN))
    assert torch.allclose(torch.tensor(d_tail, dtype=torch.float64), tail, rtol=2e-3)
    # the same sparse loss reads both; the compact targets cost a relative error of ~1e-4
    student = torch.randn(64, vocab, generator=gen, dtype=torch.float64)
    a = sparse_divergence(student, ids.sort(-1).values, exact.float(), "fkl")
    b = sparse_divergence(student, d_ids, d_lp.float(), "fkl")
    assert abs(float(a - b)) <= 1e-3 * float(a)
    # before zstd: id width + 2 bytes per entry, 2 per position (vs 8 per entry, 4 per position)
    width = codec.id_bytes(vocab)
    assert sum(len(v) for v in block.values()) == 64 * k * (width + 2) + 64 * 2 + codec.HEADER.size


@pytest.mark.parametrize("mass", [0.9999, 0.5, 3e-3, 1e-4, 1e-7])
def test_codec_keeps_the_top_k_mass_whether_tail_or_top_k_is_small(mass):
    """A flat teacher's top-k can hold a tiny share of the mass: the stored scalar must keep
    that share's relative precision too (quantising log(tail) alone shifted every decoded
    log-prob by 0.1 nats at mass 3e-3 and gave -inf at 1e-4)."""
    gen = torch.Generator().manual_seed(1)
    rel = torch.randn(8, 20, generator=gen, dtype=torch.float64).log_softmax(-1)
    lp = rel + math.log(mass)                        # top-k holding `mass` of the probability
    ids = torch.randperm(1000, generator=gen)[:20].repeat(8, 1)
    block = codec.encode_row(ids.tolist(), lp.tolist(), width=2)
    d_ids, d_lp, d_tail = codec.decode_row(*(block[c] for c in codec.COLUMNS))
    exact = lp.gather(-1, ids.argsort(-1))
    d_lp = torch.tensor(d_lp, dtype=torch.float64)
    assert torch.isfinite(d_lp).all()
    shape = lambda x: x - x.logsumexp(-1, keepdim=True)   # noqa: E731  (within the top-k)
    assert (shape(exact).exp() * (shape(exact) - shape(d_lp))).sum(-1).max() < 1e-4   # the codec's budget
    assert torch.allclose(d_lp.exp().sum(-1), torch.full((8,), mass, dtype=torch.float64), rtol=2e-3)
    assert torch.allclose(torch.tensor(d_tail, dtype=torch.float64),
                          torch.full((8,), max(1 - mass, math.exp(codec.LOG_TAIL_MIN)), dtype=torch.float64),
                          rtol=2e-3)


def test_codec_rejects_damaged_and_ragged_blocks():
    block = codec.encode_row([[5, 2], [7, 1]], [[-0.1, -3.0], [-0.5, -1.0]], width=2)
    ids_b, lv_b, meta = (block[c] for c in codec.COLUMNS)
    for bad in ((ids_b[:-1] + bytes([ids_b[-1] ^ 1]), lv_b, meta), (ids_b, lv_b[:-1], meta),
                (ids_b, lv_b, meta[:5]), (ids_b, lv_b, None)):
        with pytest.raises(codec.DamagedBlockError, match="damaged|missing"):
            codec.decode_row(*bad)
    with pytest.raises(ValueError, match="same k"):
        codec.encode_row([[1, 2], [3]], [[-1.0, -2.0], [-1.0]])


def _config(tiny_pair, out, **over) -> GenerationConfig:
    """Greedy tiny-teacher prompts, HF backend, top-8, into `out`; `over` replaces any key."""
    return GenerationConfig(**{"model": tiny_pair[0], "backend": "hf", "recipe": "arithmetic",
                               "num_prompts": 12, "max_new_tokens": 10, "topk": 8,
                               "output_dir": str(out), "shard_size": 6, **over})


@pytest.fixture(scope="module")
def generated(tiny_pair, tmp_path_factory):
    """The same greedy prompts written with an explicit `cache: lossless` and `cache: compact`."""
    root = tmp_path_factory.mktemp("gen")
    return {cache: run_generation(_config(tiny_pair, root / cache, cache=cache), progress=False)
            for cache in ("lossless", "compact")}


def test_compact_dir_reads_back_as_the_lossless_columns(generated):
    lossless, compact = (load_generated(generated[c]) for c in ("lossless", "compact"))
    assert not set(codec.COLUMNS) & set(compact.column_names)
    assert set(codec.DECODED) <= set(compact.column_names)
    pq_cols = pq.read_schema(next(generated["compact"].glob("shard-*.parquet"))).names
    assert "teacher_topk_logprobs" not in pq_cols and codec.COLUMNS[0] in pq_cols
    for a, b in zip(lossless, compact):
        assert a["response_token_ids"] == b["response_token_ids"]
        for ia, la, ib, lb in zip(a["teacher_topk_ids"], a["teacher_topk_logprobs"],
                                  b["teacher_topk_ids"], b["teacher_topk_logprobs"]):
            exact = dict(zip(ia, la))
            assert sorted(ia) == ib
            # values near the top-1 keep ~sigma; the tail is exact, so the top-1 moves little
            assert abs(max(lb) - max(la)) < 5e-3
            assert all(abs(exact[i] - v) < 1.0 for i, v in zip(ib, lb))


def test_lossless_fingerprint_is_unchanged_so_old_dirs_resume(generated, tiny_pair):
    """Dirs written before the `cache` key existed hold fingerprints without it."""
    m = read_manifest(generated["lossless"])
    assert "cache" not in m["config"] and m["fingerprint"] == fingerprint(m["config"])
    assert read_manifest(generated["compact"])["config"]["cache"] == "compact"
    with pytest.raises(ValueError, match="cache=compact .* topk=0"):
        GenerationConfig(topk=0, cache="compact")
    with pytest.raises(ValueError, match="cache='tiny' is unknown"):
        GenerationConfig(cache="tiny")


def test_damaged_compact_shard_one_line_nothing_trained(generated, tiny_pair, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(generated["compact"], bad)
    shard = sorted(bad.glob("shard-*.parquet"))[0]
    pf = pq.ParquetFile(shard)
    table, meta = pf.read(), pf.schema_arrow.metadata
    col = table.column(codec.COLUMNS[1]).to_pylist()
    col[2] = col[2][:-1] + bytes([col[2][-1] ^ 0x40])     # one flipped bit in one row's block
    table = table.set_column(table.schema.get_field_index(codec.COLUMNS[1]), codec.COLUMNS[1],
                             pa.array(col, pa.binary()))
    pq.write_table(table.replace_schema_metadata(meta), shard, compression="zstd")
    error = offline_distill_error(tmp_path, tiny_pair[1], bad, num_train=8, num_eval=4)
    assert "damaged" in error and "regenerate" in error and "row id=" in error, error


def test_compact_decode_is_hashable_so_no_warning_and_cached(generated):
    """The decode transform must hash (datasets fingerprinting): an unhashable closure printed a
    'couldn't be hashed properly' warning on every `llmkd distill` of a compact dir and redid
    the decode each load. A hashable one gives the same fingerprint twice."""
    first, second = (load_generated(generated["compact"]) for _ in range(2))
    assert first._fingerprint == second._fingerprint


# -- the default: compact for a new dir, the dir's own codec on resume ---------------------------
def test_a_new_dir_defaults_to_compact_and_trains_offline(generated, tiny_pair, tmp_path):
    from llmkd.training.config import config_from_dict
    from llmkd.training.pipeline import build_trainer

    out = run_generation(_config(tiny_pair, tmp_path / "gen", num_prompts=8), progress=False)
    assert all(codec.COLUMNS[0] in pq.read_schema(p).names for p in out.glob("shard-*.parquet"))
    m = read_manifest(out)
    assert m["config"]["cache"] == "compact"
    assert m["fingerprint"] == read_manifest(generated["compact"])["fingerprint"]   # = explicit compact
    trainer = build_trainer(config_from_dict({
        "output_dir": str(tmp_path / "run"), "use_cpu": True, "max_steps": 1, "report_to": "none",
        "save_strategy": "no", "model": {"teacher": None, "student": tiny_pair[1], "teacher_mode": "offline"},
        "data": {"path": str(out), "num_train": 6, "num_eval": 2}, "method": {"name": "token_kd", "kind": "fkl"}}))
    assert trainer.teacher is None and "teacher_topk_logprobs" in trainer.train_dataset.column_names
    assert math.isfinite(trainer.train().training_loss)


def test_resuming_a_lossless_dir_with_defaults_keeps_its_codec_and_fingerprint(generated, tiny_pair, tmp_path):
    """A dir written lossless (explicitly, or before `cache` existed: the same fingerprint) and
    rerun without `cache` resumes lossless: no refusal, no codec switch mid-dir."""
    import shutil

    old = shutil.copytree(generated["lossless"], tmp_path / "old")
    before = read_manifest(old)["fingerprint"]
    run_generation(_config(tiny_pair, old, num_prompts=14), progress=False)
    m = read_manifest(old)
    assert m["fingerprint"] == before and "cache" not in m["config"]
    assert m["metadata"]["prompts"]["generated_this_run"] == 2 and m["rows"] == 14
    names = [pq.read_schema(p).names for p in sorted(old.glob("shard-*.parquet"))]
    assert len(names) == 3 and all("teacher_topk_logprobs" in n and codec.COLUMNS[0] not in n for n in names)


def test_an_explicit_cache_other_than_the_dirs_is_refused_in_one_line(generated, tiny_pair, tmp_path, capsys):
    import yaml

    from llmkd.cli import main

    for found, asked in (("lossless", "compact"), ("compact", "lossless")):
        shards = sorted(generated[found].glob("shard-*"))
        with pytest.raises(ValueError, match=rf"cache={asked!r} but output_dir .* holds {found} shards.*"
                                             r"drop cache .*or choose another output_dir"):
            run_generation(_config(tiny_pair, generated[found], cache=asked), progress=False)
        assert sorted(generated[found].glob("shard-*")) == shards
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump({**vars(_config(tiny_pair, generated["lossless"])),
                                                       "cache": "compact"}))
    assert main(["generate", str(tmp_path / "gen.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds lossless shards" in err and "Traceback" not in err, err
