"""The first contact with a teacher server, before any weights load.

One short probe of `/v1/models`: a wrong port, a silent process or a non-vLLM server fails in
seconds with what was found, instead of after a request's retries; a server still loading its
model (vLLM listens only once it is ready) is waited for only when `model.teacher_wait` says so,
with a line every `PROGRESS_EVERY` seconds. Standard library only.
"""
from __future__ import annotations

import http.client
import json
import math
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

PROBE_TIMEOUT = 5.0      # a start-up probe's wait for /v1/models: a live vLLM answers in milliseconds
PROGRESS_EVERY = 15.0    # seconds between "still waiting" lines while model.teacher_wait runs


class TeacherServerError(ConnectionError):
    """The teacher server cannot be reached or refused a request."""


class _NotUpYet(Exception):
    """A start-up probe found no answer yet from a server that may still come up."""


def server_root(url: str) -> str:
    """The server's root: vLLM's OpenAI routes live under /v1, so a URL ending in /v1 (as an
    OpenAI client wants it) means its parent."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def check_seconds(name: str, value: Any, positive: bool) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"config: model.{name}={value!r} must be a finite number of seconds "
                         f"{'> 0' if positive else '>= 0'}")


def wait_until_up(url: str, timeout: float, wait: float = 0.0, field: str = "model.") -> dict[str, Any]:
    """The served model's `/v1/models` entry. A server that is not up yet (connection refused,
    silent, HTTP 502-504) is polled for up to `wait` seconds (`teacher_wait`); anything else fails
    at once. Errors are one line naming `field` + teacher_server (e.g. model.teachers.chat.), what
    was found and the fix."""
    check_seconds("teacher_wait", wait, positive=False)
    started = time.monotonic()
    said: float | None = None
    while True:
        try:
            return probe_models(url, min(PROBE_TIMEOUT, timeout), field)
        except _NotUpYet as err:
            waited = time.monotonic() - started
            if waited >= wait:
                after = f" after waiting {waited:.0f} s ({field}teacher_wait={wait:g})" if wait else ""
                raise TeacherServerError(
                    f"{field}teacher_server={url}: {err}{after}; start the server (`llmkd "
                    "serve-teacher CONFIG` on the teacher's machine), check the host and port, or, "
                    "if it is still loading its model (vLLM listens only once ready), "
                    f"{'raise' if wait else 'set'} {field}teacher_wait=SECONDS to wait for it") from None
            if said is None or time.monotonic() - said >= PROGRESS_EVERY:
                print(f"llmkd: waiting up to {wait:g} s ({field}teacher_wait) for the teacher server "
                      f"{url}: {err}; {waited:.0f} s so far", file=sys.stderr, flush=True)
                said = time.monotonic()
            time.sleep(min(1.0, wait - waited))


def probe_models(url: str, timeout: float, field: str) -> dict[str, Any]:
    """One GET /v1/models, no retries: the served model, `_NotUpYet` for a server that may
    still come up, `TeacherServerError` for an address where no vLLM server will answer."""
    parts = urllib.parse.urlsplit(url)
    where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    wrong = f"{field}teacher_server={url}: "
    fix = ("; check the host and port (those `llmkd serve-teacher` listens on) and that the URL "
           "is the server's root")
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=timeout) as resp:
            body, kind = resp.read(), resp.headers.get_content_type()
    except urllib.error.HTTPError as err:
        if err.code in (502, 503, 504):
            raise _NotUpYet(f"it answers HTTP {err.code} (not ready)") from None
        raise TeacherServerError(f"{wrong}GET /v1/models answered HTTP {err.code}: not a vLLM "
                                 f"OpenAI server{fix}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, socket.gaierror):
            raise TeacherServerError(f"{wrong}host {parts.hostname!r} is unknown ({reason.strerror})"
                                     f"{fix}") from None
        if isinstance(reason, ConnectionRefusedError):
            raise _NotUpYet(f"nothing listens on {where} (connection refused)") from None
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise _NotUpYet(f"{where} accepts connections but did not answer GET /v1/models "
                            f"within {timeout:g} s (a frozen process, or not an HTTP server)") from None
        raise _NotUpYet(f"cannot reach {where} ({reason})") from None
    except http.client.HTTPException as err:   # a banner or garbage where a status line belongs
        raise TeacherServerError(f"{wrong}{where} answered {type(err).__name__} ({str(err)[:60]!r}): not an "
                                 f"HTTP server{fix}") from None
    try:
        model = json.loads(body).get("data")[0]
        model["id"]
    except (ValueError, AttributeError, TypeError, IndexError, KeyError):
        shown = body[:60].decode(errors="replace")
        raise TeacherServerError(f"{wrong}GET /v1/models answered {kind} {shown!r}, not vLLM's "
                                 f"model list: not a vLLM OpenAI server (or it serves no model){fix}") from None
    return model
