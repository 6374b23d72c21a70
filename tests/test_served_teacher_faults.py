"""A served teacher that freezes mid-run (the connection stays open, no answer ever comes): a
real HTTP server on 127.0.0.1 that answers the start-up calls (/v1/models, /tokenize with the
student's own tokenizer) and then accepts /v1/completions without ever answering. Each attempt is
bounded by the batch's size, and SIGTERM or a double Ctrl-C end `llmkd distill` (the request
threads must not hold the process)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from llmkd.teacher_server import PROBE_TEXT, ServedTeacher, TeacherServerError, server_root

REPO = Path(__file__).resolve().parents[1]


class FrozenTeacher:
    """Answers the start-up calls like vLLM, then hangs on every /v1/completions."""

    def __init__(self, tokens: list[int], listening: bool = True) -> None:
        self.asked = threading.Event()      # a /v1/completions request arrived
        self.release = threading.Event()    # set at teardown: the stuck handlers return
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):   # keep pytest's output clean
                pass

            def _json(self, obj) -> None:
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._json({"data": [{"id": "frozen", "max_model_len": 4096}]})

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/tokenize":
                    return self._json({"tokens": tokens})
                outer.asked.set()
                outer.release.wait(600)     # frozen: the connection stays open, nothing is sent

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.httpd.daemon_threads = True
        self.httpd.server_bind()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.serving = False
        if listening:
            self.listen()

    def listen(self) -> None:
        """Until now the port was bound but not listening, as vLLM's while its model loads."""
        self.httpd.server_activate()
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.serving = True

    def close(self) -> None:
        self.release.set()
        if self.serving:
            self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def frozen(tiny_pair):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair[1])
    server = FrozenTeacher(tok(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    yield server
    server.close()


def _batch(lengths: list[int]):
    ids = torch.zeros((len(lengths), max(lengths)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(3, 3 + n)
        mask[i, :n] = 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return ids, mask, labels


def test_a_frozen_server_fails_each_attempt_in_a_time_sized_by_the_batch(frozen):
    client = ServedTeacher(frozen.url + "/v1/", 5, timeout=0.2, timeout_per_token=0.004, retries=1,
                           backoff=0.01)
    assert client.url == frozen.url            # an OpenAI-style URL ending in /v1 means the server
    pending = client.submit(*_batch([60, 40]))   # 100 tokens: 0.2 + 100 x 0.004 = 0.6 s per attempt
    with pytest.raises(TeacherServerError, match=r"did not answer /v1/completions after 2 attempts .*"
                                                  r"each attempt waited 0.6 s \(model.teacher_timeout"):
        client.wait(pending)
    client.close()
    assert server_root("http://h:8000") == server_root("http://h:8000/v1") == "http://h:8000"


@pytest.fixture
def loading(tiny_pair):
    """(server, tokenizer): a teacher server whose port is bound but not yet listening."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair[1])
    server = FrozenTeacher(tok(PROBE_TEXT, add_special_tokens=False)["input_ids"], listening=False)
    yield server, tok
    server.close()


def test_a_server_still_loading_fails_at_once_unless_teacher_wait_says_wait(loading, capsys):
    server, tok = loading
    with pytest.raises(TeacherServerError, match=r"^model.teacher_server=http://127.0.0.1:\d+: nothing listens "
                                                 r"on 127.0.0.1:\d+ \(connection refused\); start the server .*"
                                                 r"set model.teacher_wait=SECONDS"):
        ServedTeacher(server.url, 5).connect(tok)
    assert capsys.readouterr().err == ""        # no wait asked: no progress lines
    with pytest.raises(TeacherServerError, match=r"model.teachers.chat.teacher_server=.* after waiting 2 s "
                                                 r"\(model.teachers.chat.teacher_wait=1.5\).* raise "
                                                 r"model.teachers.chat.teacher_wait"):
        ServedTeacher(server.url, 5).connect(tok, 1.5, "model.teachers.chat.")
    assert "llmkd: waiting up to 1.5 s (model.teachers.chat.teacher_wait) for the teacher server" in capsys.readouterr().err
    timer = threading.Timer(2.0, server.listen)   # the model has loaded: vLLM starts listening
    timer.start()
    client = ServedTeacher(server.url, 5)
    try:
        client.connect(tok, 600)
    finally:
        timer.join()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("llmkd: waiting up to 600 s (model.teacher_wait) for the teacher "
                                               f"server {server.url}: nothing listens on "), err
    assert client.model_info() == {"id": "frozen", "max_model_len": 4096}
    with pytest.raises(ValueError, match="config: model.teacher_wait=-1 must be a finite number of seconds >= 0"):
        client.connect(tok, -1)


def test_timeouts_are_checked(frozen):
    for kwargs, field in (({"timeout": 0}, "teacher_timeout=0"),
                          ({"timeout_per_token": float("nan")}, "teacher_timeout_per_token=nan"),
                          ({"timeout": "long"}, "teacher_timeout='long'")):
        with pytest.raises(ValueError, match=f"config: model.{field} must be a finite number of seconds"):
            ServedTeacher(frozen.url, **kwargs)


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT, signal.SIGINT)],
                         ids=["sigterm", "double-ctrl-c"])
def test_a_signal_ends_a_run_waiting_on_a_frozen_teacher(frozen, tiny_pair, tmp_path, signals):
    """No model.teacher (the README's served example); a timeout far beyond the test's wait, so
    only the signal handling can end the run."""
    cfg = {"output_dir": str(tmp_path / "out"), "use_cpu": True, "max_steps": 5, "save_strategy": "no",
           "report_to": "none", "per_device_train_batch_size": 2, "disable_tqdm": True,
           "model": {"student": tiny_pair[1], "teacher_server": frozen.url, "teacher_topk": 5,
                     "teacher_timeout": 3600},
           "data": {"recipe": "arithmetic", "num_train": 8, "num_eval": 2},
           "method": {"name": "token_kd", "kind": "fkl"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    child = subprocess.Popen([sys.executable, "-m", "llmkd.cli", "distill", str(tmp_path / "cfg.yaml")],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert frozen.asked.wait(300), "the run never asked the teacher"
        for i, sig in enumerate(signals):
            if i:
                time.sleep(1)   # two signals sent together arrive as one
            child.send_signal(sig)
        _, err = child.communicate(timeout=120)   # a hang here is the bug
    finally:
        child.kill()
    assert "Traceback" not in err and child.returncode == 128 + signals[-1], err
    lines = [line for line in err.splitlines() if line.startswith("llmkd distill: ")]
    assert len(lines) == 1, err
    expect = ("stopped at once by a second SIGINT during step 1" if len(signals) == 2 else
              "interrupted by SIGTERM during step 1 while waiting for the teacher server, without saving")
    assert expect in lines[0], lines[0]


@pytest.mark.parametrize("max_length,expect", [(512, 512), (100, 101)])
def test_serve_teacher_fits_the_models_positions(tiny_pair, tmp_path, capsys, max_length, expect):
    """The request scores max_length tokens and generates one, but never more than the model has
    positions (the tiny teacher has 512: vLLM refuses to start with 513)."""
    from llmkd.cli.serve import main

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"model": {"teacher": tiny_pair[0]},
                                                       "data": {"max_length": max_length}}))
    assert main([str(tmp_path / "cfg.yaml"), "--dry-run"]) == 0
    argv = capsys.readouterr().out.split()
    assert argv[argv.index("--max-model-len") + 1] == str(expect)


@pytest.fixture
def not_http():
    """A port held by a service that does not speak HTTP (an SSH banner) or cuts its reply short
    (a Content-Length promised, fewer bytes sent): what a wrong port or a dying server looks like."""
    import socket

    sock = socket.create_server(("127.0.0.1", 0))
    replies = {"banner": b"SSH-2.0-OpenSSH_9.6\r\n",
               "short": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"da"}
    mode = {"reply": "banner", "seen": 0}

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                mode["seen"] += 1
                conn.sendall(replies[mode["reply"]])

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", mode
    sock.close()


def test_a_port_that_does_not_speak_http_fails_in_one_line(not_http):
    from llmkd.teacher_probe import wait_until_up

    url, _ = not_http
    with pytest.raises(TeacherServerError, match="not an HTTP server.*check the host and port"):
        wait_until_up(url, 5.0)


def test_a_reply_cut_short_is_retried_then_fails_clearly(not_http):
    url, mode = not_http
    mode["reply"] = "short"
    client = ServedTeacher(url, 4, timeout=5.0, retries=2, backoff=0.01)
    client._model = {"id": "m"}
    with pytest.raises(TeacherServerError, match="did not answer /v1/completions after 3 attempts"):
        client._request(*client.payload([[1, 2, 3]]))
    assert mode["seen"] == 3


def test_a_head_with_fewer_rows_than_its_tokenizer_says_so(tmp_path):
    from safetensors.torch import save_file

    from llmkd.generation.hidden import check_head_file

    path = tmp_path / "head.safetensors"
    save_file({"weight": torch.zeros(512, 8)}, str(path), metadata={"vocab": "513"})
    with pytest.raises(ValueError, match="512 rows but its tokenizer 513 tokens"):
        check_head_file(path, 513, missing="")
