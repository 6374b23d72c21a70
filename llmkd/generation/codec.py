"""Compact top-k cache codec (`generate` config `cache: compact`): a self-checking block per row.

A row's teacher top-k (T positions x k entries) becomes three byte streams, each its own parquet
column so that the shard's zstd sees like next to like across rows:

  ids      per position the k token ids sorted ascending and delta-coded (gaps of ~V/k instead
           of ids up to V), as 2-byte (vocab <= 65,536) or 4-byte integers split into byte planes
           (all high bytes, then all low bytes): high planes are nearly constant and cost little.
  levels   each entry's gap below the position's top-1 log-prob, d = lp_top1 - lp >= 0, on a
           companded scale: the step is sigma * exp(d / 2) nats, at most MAX_STEP. An error e in a
           bin of mass p costs about p e^2 / 2 nats of KL and p ~ exp(-d), so every entry near the
           top costs the same KL (~ sigma^2 / 24 times the top-1 mass) and entries far below it get
           coarse steps. uint16 levels in byte planes, in the ids' (sorted) order.
  meta     a header (positions, k, id width, sigma, max step, CRC-32 of all three streams) and
           per position the log of the smaller of the top-k mass and the tail mass (a flag bit says
           which) as 15 bits on [LOG_TAIL_MIN, 0]: the larger of the two is 1 minus it, so both keep
           their relative precision (a flat teacher whose top-k holds 1e-4 of the mass as well as
           a peaked one whose tail holds 1e-4).

Decoding rebuilds the log-probs so that the top-k mass is exactly 1 - tail: the tail the sparse
loss derives from them keeps its stored value and quantisation only bends the shape within the
top-k. Decoded lists are ordered by token id (the loss does not care about order). A block whose
checksum or layout does not match raises `DamagedBlockError`: a corrupt shard never trains.
"""
from __future__ import annotations

import math
import struct
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset

MAGIC = b"LKC1"
HEADER = struct.Struct("<4sIHBxffI")   # magic, positions T, k, id bytes, sigma, max step, crc32
SIGMA = 0.01                            # step at the top-1 (nats)
MAX_STEP = 0.35                         # coarsest step, far below the top-1 (nats)
MAX_GAP = 80.0                          # gaps beyond this (incl. -inf log-probs) are clamped
LOG_TAIL_MIN = -40.0                    # masses below exp(-40) are stored as exp(-40)
SMALL_LEVELS = 0x7FFF                   # 15 bits for log(min(top-k mass, tail)); the top bit says which
COLUMNS = ("teacher_topk_compact_ids", "teacher_topk_compact_levels", "teacher_topk_compact_meta")
DECODED = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_mass")


class DamagedBlockError(ValueError):
    """A compact block whose checksum or layout does not match: the shard is corrupt."""


def _knee(sigma: float, max_step: float) -> tuple[float, float]:
    """(gap where the step reaches max_step, level at that gap)."""
    d_knee = max(0.0, 2.0 * math.log(max_step / sigma))
    return d_knee, (2.0 / sigma) * (1.0 - math.exp(-d_knee / 2.0))


def gap_to_level(gap: np.ndarray, sigma: float = SIGMA, max_step: float = MAX_STEP) -> np.ndarray:
    """Companded level (float) of gaps >= 0: dlevel/dgap = max(exp(-gap/2) / sigma, 1 / max_step)."""
    d_knee, u_knee = _knee(sigma, max_step)
    gap = np.clip(gap, 0.0, MAX_GAP)
    near = (2.0 / sigma) * -np.expm1(-np.minimum(gap, d_knee) / 2.0)
    return np.where(gap <= d_knee, near, u_knee + (gap - d_knee) / max_step)


def level_to_gap(level: np.ndarray, sigma: float = SIGMA, max_step: float = MAX_STEP) -> np.ndarray:
    d_knee, u_knee = _knee(sigma, max_step)
    level = np.asarray(level, dtype=np.float64)
    near = -2.0 * np.log1p(-np.minimum(level, u_knee) * sigma / 2.0)
    return np.where(level <= u_knee, near, d_knee + (level - u_knee) * max_step)


def _planes(values: np.ndarray, dtype: str) -> bytes:
    """Little-endian integers split into byte planes (most significant plane first)."""
    raw = np.ascontiguousarray(values, dtype=dtype).view(np.uint8).reshape(-1, np.dtype(dtype).itemsize)
    return raw[:, ::-1].T.tobytes()


def _unplanes(data: bytes, n: int, dtype: str) -> np.ndarray:
    width = np.dtype(dtype).itemsize
    planes = np.frombuffer(data, dtype=np.uint8).reshape(width, n)
    return np.ascontiguousarray(planes[::-1].T).view(dtype).reshape(n)


def id_bytes(vocab: int) -> int:
    return 2 if vocab <= 65536 else 4


def encode_row(ids: list[list[int]], logprobs: list[list[float]], *, width: int = 4,
               sigma: float = SIGMA, max_step: float = MAX_STEP) -> dict[str, bytes]:
    """One row's top-k lists -> its compact block (COLUMNS -> bytes). All positions hold k entries."""
    t = len(ids)
    k = len(ids[0]) if t else 0
    if t != len(logprobs) or any(len(a) != k or len(b) != k for a, b in zip(ids, logprobs)):
        raise ValueError("cache=compact: every position of a row must hold the same k ids and "
                         "log-probs; use cache: lossless for ragged top-k lists")
    id_arr = np.asarray(ids, dtype=np.int64).reshape(t, k)
    lp = np.asarray(logprobs, dtype=np.float64).reshape(t, k)
    if k and (id_arr.min() < 0 or id_arr.max() >= 256 ** width):
        raise ValueError(f"cache=compact: token id outside [0, {256 ** width}) for {width}-byte ids")
    order = np.argsort(id_arr, axis=1, kind="stable")
    id_arr, lp = np.take_along_axis(id_arr, order, 1), np.take_along_axis(lp, order, 1)
    gaps = np.diff(id_arr, axis=1, prepend=0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        top = lp.max(axis=1, keepdims=True) if k else np.zeros((t, 1))
        gap = np.nan_to_num(top - lp, nan=MAX_GAP, posinf=MAX_GAP)
        levels = np.rint(gap_to_level(gap, sigma, max_step))
        log_mass = np.minimum(np.log(np.exp(lp).sum(axis=1)), 0.0) if k else np.full(t, -np.inf)
        log_tail = np.log(np.clip(-np.expm1(log_mass), 0.0, None))
    mass_smaller = log_mass < log_tail
    log_small = np.where(mass_smaller, log_mass, log_tail)
    log_small = np.clip(np.nan_to_num(log_small, nan=LOG_TAIL_MIN, neginf=LOG_TAIL_MIN), LOG_TAIL_MIN, 0.0)
    tail_q = np.rint(log_small / LOG_TAIL_MIN * SMALL_LEVELS) + mass_smaller * (SMALL_LEVELS + 1)
    ids_b = _planes(gaps.reshape(-1), f"<u{width}")
    lv_b = _planes(levels.reshape(-1), "<u2")
    tail_b = _planes(tail_q, "<u2")
    crc = zlib.crc32(tail_b, zlib.crc32(lv_b, zlib.crc32(ids_b)))
    meta = HEADER.pack(MAGIC, t, k, width, sigma, max_step, crc) + tail_b
    return dict(zip(COLUMNS, (ids_b, lv_b, meta)))


def decode_row(ids_b: bytes, lv_b: bytes, meta: bytes) -> tuple[list[list[int]], list[list[float]], list[float]]:
    """A compact block -> (top-k ids, float32 log-probs, tail mass), lists per position."""
    if meta is None or ids_b is None or lv_b is None or len(meta) < HEADER.size:
        raise DamagedBlockError("compact top-k block is missing or shorter than its header")
    magic, t, k, width, sigma, max_step, crc = HEADER.unpack_from(meta)
    tail_b = meta[HEADER.size:]
    n = t * k
    if (magic != MAGIC or width not in (2, 4) or len(ids_b) != n * width or len(lv_b) != 2 * n
            or len(tail_b) != 2 * t or zlib.crc32(tail_b, zlib.crc32(lv_b, zlib.crc32(ids_b))) != crc):
        raise DamagedBlockError("compact top-k block is damaged (checksum or length mismatch)")
    ids = np.cumsum(_unplanes(ids_b, n, f"<u{width}").astype(np.int64).reshape(t, k), axis=1)
    levels = _unplanes(lv_b, n, "<u2").reshape(t, k)
    code = _unplanes(tail_b, t, "<u2").astype(np.int64)
    log_small = (code & SMALL_LEVELS) / SMALL_LEVELS * LOG_TAIL_MIN
    with np.errstate(divide="ignore"):
        log_other = np.log(-np.expm1(log_small))
    mass_smaller = code > SMALL_LEVELS
    log_tail = np.where(mass_smaller, log_other, log_small)
    log_mass = np.where(mass_smaller, log_small, log_other)
    rel = -level_to_gap(levels, sigma, max_step)                     # log-probs relative to top-1
    if k:
        lse = np.log(np.exp(rel).sum(axis=1, keepdims=True))          # rel <= 0 with a 0: stable
        lp = rel - lse + log_mass[:, None]                              # top-k mass = 1 - tail
    else:
        lp = rel
    return ids.tolist(), lp.astype(np.float32).tolist(), np.exp(log_tail).astype(np.float32).tolist()


def _decode_batch(b: dict[str, list[Any]], source: str) -> dict[str, list[Any]]:
    """One batch of `decode_dataset`; a module-level function so datasets can hash it (a closure
    is not: it warned on every load and defeated the cache)."""
    out: dict[str, list[Any]] = {c: [] for c in DECODED}
    for i, block in enumerate(zip(*(b[c] for c in COLUMNS))):
        try:
            decoded = decode_row(*block)
        except DamagedBlockError as err:
            raise DamagedBlockError(f"{source}: row id={b['id'][i]!r}: {err}; the shard is corrupt: "
                                    "regenerate it (delete the shard and rerun `llmkd generate`, "
                                    "which fills in what is missing)") from None
        for c, v in zip(DECODED, decoded):
            out[c].append(v)
    return out


def decode_dataset(rows: Dataset, source: str) -> Dataset:
    """Replace the compact columns of generated rows by the top-k columns the loss reads."""
    return rows.map(_decode_batch, batched=True, fn_kwargs={"source": source}, remove_columns=list(COLUMNS),
                    desc="decode compact top-k")
