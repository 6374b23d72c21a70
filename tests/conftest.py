"""Shared fixtures: tiny models built on the spot (no hub), CPU-friendly settings."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(teacher_dir, student_dir): tiny Llamas sharing a locally trained tokenizer."""
    from llmkd.models.tiny import save_tiny_pair

    teacher, student = save_tiny_pair(tmp_path_factory.mktemp("tiny"))
    return str(teacher), str(student)
