"""A teacher behind a vLLM OpenAI-compatible server (`model.teacher_server: URL`).

A teacher too big to sit beside the student runs on its own machine(s) under vLLM; the trainer
sends token ids (prompt + response) to `/v1/completions` with `prompt_logprobs=k` and gets the
teacher's top-k log-probs at every position, which it lays on the label positions exactly like the
offline top-k columns of `llmkd generate` (`DistillCollator`): the sparse top-k + tail loss then
runs for any divergence, on dataset and on sampled (on-policy) responses alike.

Requests carry several sequences each and run on daemon threads, so they overlap each other and
the student's forward (`submit` returns at once) and a request stuck on a frozen server never
keeps the process alive at exit. Each attempt may take `timeout` seconds plus
`timeout_per_token` per token of the batch (a frozen server fails in seconds, a big batch still
gets its time); a failing server is retried with exponential backoff, a bounded number of times,
then a `TeacherServerError` names the URL and what to do.

With `model.teacher_targets: hidden` the server is vLLM's pooling runner instead (`llmkd
serve-teacher` starts it so): `/pooling` with task `token_embed` returns the teacher's final,
post-norm hidden state at every position, and the trainer applies the teacher's output head
(`model.teacher_head`) chunk by chunk, as for hidden states stored by `llmkd generate`: exact
full-vocabulary targets from a teacher that runs elsewhere. After a SIGINT/SIGTERM, no request is
retried and training waits on the server only `ABANDON_GRACE` seconds more (`abandon_waits`), so
a frozen server cannot hold a stopping run past a scheduler's kill deadline. Only the standard
library talks HTTP; torch is imported where tensors are built.
"""
from __future__ import annotations

import http.client
import json
import math
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING, Any, Callable

from llmkd.teacher_probe import TeacherServerError, check_seconds, server_root, wait_until_up

if TYPE_CHECKING:
    import torch

PROBE_TEXT = "The answer is 42, naïve café: 3.14 + x_1\n"
RETRY_HTTP = {408, 429, 500, 502, 503, 504}
TARGETS = ("topk", "hidden")
WIRE_DTYPES = ("float32", "bfloat16", "float16")     # hidden states travel in the teacher's dtype


class TeacherWaitAbandoned(KeyboardInterrupt):
    """A stop signal came while training waited on the teacher server."""


ABANDON_GRACE = 5.0        # seconds a stopping run still waits for an answer (the step then saves)
_abandoned_at: list[float] = []


def abandon_waits(on: bool = True) -> None:
    """Called from a signal handler (on=True): no request is retried, and waits on a server give
    up `ABANDON_GRACE` seconds later with `TeacherWaitAbandoned`. on=False re-arms."""
    _abandoned_at[:] = [time.monotonic()] if on else []


def _abandoned(grace: float = 0.0) -> bool:
    return bool(_abandoned_at) and time.monotonic() - _abandoned_at[0] >= grace


def check_teacher_server(url: str, topk: int, targets: str = "topk", head: str | None = None) -> None:
    """Config-time checks (no network): an http(s) URL with a host, k >= 1, known targets, and
    for hidden targets the head file's path."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"config: model.teacher_server={url!r} is not an http(s) URL; give the "
                         "vLLM server's address, e.g. http://teacher-node:8000")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"config: model.teacher_topk={topk!r} must be an integer >= 1 (e.g. 20)")
    if targets not in TARGETS:
        raise ValueError(f"config: model.teacher_targets={targets!r} is unknown; use topk (log-probs) "
                         "or hidden (final hidden states from vLLM's pooling runner)")
    if targets == "hidden" and not head:
        raise ValueError("config: model.teacher_targets=hidden needs model.teacher_head: the path of the "
                         "teacher_head.safetensors that `llmkd serve-teacher CONFIG` writes")


class _DaemonPool:
    """`submit` like ThreadPoolExecutor's, on daemon threads: ThreadPoolExecutor joins its
    threads at exit, so a request stuck on a frozen server would keep a stopped run alive."""

    def __init__(self, workers: int, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = workers
        for i in range(workers):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as err:   # noqa: BLE001 - handed to the caller's result()
                future.set_exception(err)

    def shutdown(self) -> None:
        """Cancel what has not started; idle threads end (running ones end with their request)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in range(self._workers):
            self._queue.put(None)


class ServedTeacher:
    """Client of one teacher server. `topk` log-probs per position (> 20 needs the server's
    `--max-logprobs` >= k, which `llmkd serve-teacher` sets); each attempt may take `timeout` +
    `timeout_per_token` x the batch's tokens seconds (all of a batch's requests share the server);
    `retries` attempts after the first, waiting `backoff`, 2x`backoff`, 4x`backoff`, ... seconds."""

    def __init__(self, url: str, topk: int = 20, *, timeout: float = 30.0, timeout_per_token: float = 0.01,
                 retries: int = 5, backoff: float = 1.0, concurrency: int = 4,
                 sequences_per_request: int = 8, targets: str = "topk", dtype: str = "float32") -> None:
        check_teacher_server(url, topk)
        if targets not in TARGETS or dtype not in WIRE_DTYPES:
            raise ValueError(f"targets={targets!r} / dtype={dtype!r}: use one of {TARGETS} / {WIRE_DTYPES}")
        self.targets, self.dtype = targets, dtype
        check_seconds("teacher_timeout", timeout, positive=True)
        check_seconds("teacher_timeout_per_token", timeout_per_token, positive=False)
        self.url = server_root(url)
        self.topk = topk
        self.timeout, self.timeout_per_token = float(timeout), float(timeout_per_token)
        self.retries, self.backoff = retries, backoff
        self.sequences_per_request = sequences_per_request
        self._pool = _DaemonPool(concurrency, "llmkd-teacher")
        self._model: dict[str, Any] | None = None

    # -- HTTP ---------------------------------------------------------------------------------
    def _request(self, path: str, payload: dict | None = None, timeout: float | None = None) -> dict:
        """GET (payload None) or POST JSON, with bounded retries on connection errors, timeouts
        (`timeout` seconds of silence, default `self.timeout`) and 5xx / 429; other HTTP errors
        fail at once with the server's message."""
        data = None if payload is None else json.dumps(payload).encode()
        timeout = self.timeout if timeout is None else timeout
        last: BaseException | None = None
        started = time.monotonic()
        attempts = 0
        for attempt in range(self.retries + 1):
            if attempt and _abandoned():
                raise TeacherWaitAbandoned(f"a stop signal came while the teacher server {self.url} "
                                           f"was failing (last error: {last})")
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"})
            attempts += 1
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as err:
                body = err.read().decode(errors="replace")[:500]
                if err.code not in RETRY_HTTP:
                    hint = self._hint(path, err.code, body)
                    raise TeacherServerError(f"teacher server {self.url} refused {path} "
                                             f"(HTTP {err.code}: {body}){hint}") from err
                last = err
            except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException,
                    json.JSONDecodeError) as err:   # refused, reset, timeout, a reply cut short
                last = err
        slow = isinstance(last, TimeoutError) or "timed out" in str(last)
        raise TeacherServerError(
            f"teacher server {self.url} did not answer {path} after {attempts} attempts over "
            f"{time.monotonic() - started:.0f} s (last error: {last})"
            + (f"; each attempt waited {timeout:.1f} s (model.teacher_timeout + "
               "model.teacher_timeout_per_token x the batch's tokens: raise them for a slow server)"
               if slow else "")
            + "; check that it is running and reachable (llmkd serve-teacher CONFIG starts one)") from last

    def connect(self, tokenizer: Any, wait: float = 0.0, field: str = "model.") -> None:
        """First contact, before any weights load (`llmkd.teacher_probe.wait_until_up`), then the
        server must tokenize like the student."""
        self._model = wait_until_up(self.url, self.timeout, wait, field)
        self.check_tokenizer(tokenizer)

    def _hint(self, path: str, code: int, body: str) -> str:
        """What to do about a refused request, where the server's own message does not say."""
        if path == "/pooling":
            return ("; the server does not serve hidden states: start it with `llmkd serve-teacher CONFIG "
                    "--set model.teacher_targets=hidden` (vLLM's pooling runner), or set "
                    "model.teacher_targets=topk" if code == 404 or "pooling_task" in body else "")
        if path == "/v1/completions" and code == 404:
            return ("; the server serves hidden states (vLLM's pooling runner), not log-probs: set "
                    "model.teacher_targets=hidden and model.teacher_head, or restart it with "
                    "model.teacher_targets=topk")
        if "logprobs" in body:
            return (f"; the server allows fewer log-probs than model.teacher_topk={self.topk}: "
                    f"start it with --max-logprobs {self.topk} (llmkd serve-teacher does)")
        return ""

    def model_info(self) -> dict[str, Any]:
        """The served model's id and max_model_len (`/v1/models`, asked once)."""
        if self._model is None:
            models = self._request("/v1/models").get("data") or []
            if not models:
                raise TeacherServerError(f"teacher server {self.url} serves no model")
            self._model = models[0]
        return self._model

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Token-level KD needs one tokenizer: the server's must encode a probe text like ours.
        Also the first contact, so a missing server fails before training starts."""
        served = self._request("/tokenize", {"model": self.model_info()["id"], "prompt": PROBE_TEXT,
                                             "add_special_tokens": False}).get("tokens")
        ours = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        if served != ours:
            raise ValueError(f"the teacher at model.teacher_server={self.url} tokenizes differently from "
                             f"the student ({served[:8]}... vs {ours[:8]}...); token-level KD needs one "
                             "shared tokenizer")

    def check_hidden(self, tokenizer: Any, width: int) -> None:
        """Hidden targets: the server answers `/pooling` (it runs the pooling runner, else one
        line saying how to start it) with states as wide as the teacher head's (`width`)."""
        ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        states = self._hidden_rows([ids], self.timeout)[0]
        if states.shape[-1] != width:
            raise ValueError(f"the teacher at model.teacher_server={self.url} returns hidden states of "
                             f"width {states.shape[-1]} but model.teacher_head has {width} columns; the "
                             "head file belongs to another teacher: rewrite it with `llmkd serve-teacher` "
                             "for the served model")

    # -- top-k log-probs or hidden states -------------------------------------------------------
    def submit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               labels: torch.Tensor) -> Future:
        """Start the requests for a right-padded batch. Top-k: the Future gives (ids, log-probs),
        each (B, S, k), with the teacher's top-k for the token at each label position (the
        distribution that predicts it), as the offline top-k columns lay them. Hidden: it gives
        (B, S, H) float32 states, position j holding the state whose logits predict token j + 1
        (only up to each row's last label is asked for; the rest is zeros, masked by the loss)."""
        lengths = attention_mask.sum(-1).tolist()
        positions = [[j for j in range(n) if lab[j] != -100 and j > 0]
                     for lab, n in zip(labels.cpu().tolist(), lengths)]
        if self.targets == "hidden":     # states at 0 .. last label - 1 predict every label
            lengths = [max(wanted, default=1) for wanted in positions]
        seqs = [row[:n].tolist() for row, n in zip(input_ids.cpu(), lengths)]
        limit = self.model_info().get("max_model_len")
        if limit is not None and max(lengths, default=0) + 1 > limit:
            raise ValueError(f"a sequence of {max(lengths)} tokens does not fit the teacher server's "
                             f"max_model_len={limit} (one more token is generated); restart it with "
                             "a larger --max-model-len or lower data.max_length")
        step = self.sequences_per_request
        timeout = self.timeout + self.timeout_per_token * sum(lengths)
        if self.targets == "hidden":
            parts = [self._pool.submit(self._hidden_rows, seqs[i:i + step], timeout)
                     for i in range(0, len(seqs), step)]
        else:
            parts = [self._pool.submit(self._topk_rows, seqs[i:i + step], positions[i:i + step], timeout)
                     for i in range(0, len(seqs), step)]
        out: Future = Future()
        shape = tuple(input_ids.shape)

        def assemble(_: Future) -> None:
            if out.done() or not all(p.done() for p in parts):
                return
            try:
                rows = [r for p in parts for r in p.result()]
                out.set_result(self._states(rows, shape) if self.targets == "hidden"
                               else self._tensors(rows, positions, shape))
            except BaseException as err:   # noqa: BLE001 - handed to the caller's result()
                out.set_exception(err)

        for p in parts:
            p.add_done_callback(assemble)
        return out

    def wait(self, pending: Future) -> tuple[torch.Tensor, torch.Tensor]:
        """`pending.result()`, given up (`TeacherWaitAbandoned`) once a stop signal is
        `ABANDON_GRACE` seconds old."""
        while not wait_futures([pending], timeout=0.1).done:
            if _abandoned(ABANDON_GRACE):
                raise TeacherWaitAbandoned(f"a stop signal came while waiting for the teacher server {self.url}")
        return pending.result()

    def _topk_rows(self, seqs: list[list[int]], positions: list[list[int]], timeout: float
                   ) -> list[list[tuple[list[int], list[float]]]]:
        """One request for a few sequences: per sequence, (ids, log-probs) at each wanted position."""
        reply = self._request(*self.payload(seqs), timeout)
        choices = sorted(reply["choices"], key=lambda c: c["index"])
        if len(choices) != len(seqs):
            raise TeacherServerError(f"teacher server {self.url} answered {len(choices)} of "
                                     f"{len(seqs)} sequences")
        out = []
        for choice, wanted in zip(choices, positions):
            per_pos = choice["prompt_logprobs"]
            rows = []
            for j in wanted:
                # top-k by rank; vLLM adds the actual token when it is outside the top-k
                entries = sorted((v["rank"], -v["logprob"], int(t)) for t, v in per_pos[j].items()
                                 if v["rank"] <= self.topk)[:self.topk]
                rows.append(([t for _, _, t in entries], [-nlp for _, nlp, _ in entries]))
            out.append(rows)
        return out

    def payload(self, seqs: list[list[int]]) -> tuple[str, dict[str, Any]]:
        """(route, request body) asking for the targets of a few token-id sequences."""
        if self.targets == "hidden":
            return "/pooling", {"model": self.model_info()["id"], "input": seqs, "task": "token_embed",
                                "encoding_format": "base64", "embed_dtype": self.dtype, "endianness": "little",
                                "add_special_tokens": False}
        return "/v1/completions", {"model": self.model_info()["id"], "prompt": seqs, "max_tokens": 1,
                                   "temperature": 0.0, "prompt_logprobs": self.topk}

    def _hidden_rows(self, seqs: list[list[int]], timeout: float) -> list[torch.Tensor]:
        """One `/pooling` request for a few sequences: per sequence, its (n, H) final hidden states
        (base64 of raw little-endian values in the teacher's dtype; JSON floats would be ~3x)."""
        import base64

        import torch

        reply = self._request(*self.payload(seqs), timeout)
        items = sorted(reply.get("data") or [], key=lambda d: d["index"])
        if len(items) != len(seqs):
            raise TeacherServerError(f"teacher server {self.url} answered {len(items)} of "
                                     f"{len(seqs)} sequences")
        out = []
        for item, seq in zip(items, seqs):
            raw = bytearray(base64.b64decode(item["data"]))
            out.append(torch.frombuffer(raw, dtype=getattr(torch, self.dtype)).view(len(seq), -1).float())
        return out

    def _states(self, rows: list[torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        import torch

        b, s = shape
        out = torch.zeros((b, s, rows[0].shape[-1] if rows else 0), dtype=torch.float32)
        for i, states in enumerate(rows):
            out[i, :len(states)] = states
        return out

    def _tensors(self, rows: list[list[tuple[list[int], list[float]]]], positions: list[list[int]],
                 shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        b, s = shape
        k = self.topk
        ids = torch.zeros((b, s, k), dtype=torch.long)
        # like DistillCollator: non-label positions get a finite uniform row (the loss masks them)
        logprobs = torch.full((b, s, k), -math.log(k), dtype=torch.float32)
        for i, (row, wanted) in enumerate(zip(rows, positions)):
            for j, (tok, lp) in zip(wanted, row):
                pad = k - len(tok)        # fewer than k tokens in the vocabulary: -1 = empty slot
                ids[i, j] = torch.tensor(tok + [-1] * pad)
                logprobs[i, j] = torch.tensor(lp + [0.0] * pad)
        return ids, logprobs

    def close(self) -> None:
        self._pool.shutdown()
