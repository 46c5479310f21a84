"""Byte-level tokens of captions, for the trainable byte text encoder (models/text.py) and
the input pipeline: no vocabulary file.

Tokens: 0 = padding, 1 = BOS (always first, so the empty caption of classifier-free
guidance is a valid one-token sequence), 2 + b for byte b.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PAD, BOS, BYTE_OFFSET = 0, 1, 2
VOCAB_SIZE = 256 + BYTE_OFFSET
SPACE = ord(" ") + BYTE_OFFSET


def tokenize(captions: Sequence[str] | str, max_len: int) -> np.ndarray:
  """Captions -> int32 [N, max_len] (or [max_len] for one string): BOS, UTF-8 bytes, padding.

  Longer captions are cut at max_len tokens.
  """
  single = isinstance(captions, str)
  out = np.zeros((1 if single else len(captions), max_len), np.int32)
  for i, text in enumerate([captions] if single else captions):
    ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)[: max_len - 1] + BYTE_OFFSET
    out[i, 0] = BOS
    out[i, 1 : 1 + len(ids)] = ids
  return out[0] if single else out


def detokenize(tokens: np.ndarray) -> str:
  ids = np.asarray(tokens)
  return bytes((ids[ids >= BYTE_OFFSET] - BYTE_OFFSET).astype(np.uint8)).decode("utf-8", "replace")
