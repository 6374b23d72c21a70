"""Kept for `from llmkd.data.alignment import align_chunks` (documented in the README); the code
lives in llmkd/data/alignment.py."""
from llmkd.data.alignment import AlignedText, ChunkAligner, align_chunks, chunks_from_offsets

__all__ = ["AlignedText", "ChunkAligner", "align_chunks", "chunks_from_offsets"]
