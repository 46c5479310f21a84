"""The byte-level text encoder: tokens, word pooling, word hashing, padding invariance."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import tokens as tokens_lib
from jdiff.models import text


def _encoder(**kw):
  cfg = dict(encoder="bytes", width=32, depth=1, num_heads=2, max_len=48, conv_kernel=5, max_words=8,
             word_buckets=64)
  cfg.update(kw)
  return text.build(cfg)


def test_word_pooling_by_hand():
  tokens = jnp.asarray(tokens_lib.tokenize(["a red  circle", ""], 16))
  x = jnp.arange(16, dtype=jnp.float32)[None, :, None].repeat(2, 0)
  words, valid = text._pool_words_impl(tokens, x, 5)
  # BOS at 0; 'a' at 1; 'red' at 3..5; 'circle' at 8..13 (two spaces skipped).
  np.testing.assert_allclose(words[0, :, 0], [0.0, 1.0, 4.0, 10.5, 0.0])
  np.testing.assert_array_equal(valid, [[True, True, True, True, False], [True, False, False, False, False]])


def test_word_hashes_depend_on_the_word_only():
  tokens = jnp.asarray(tokens_lib.tokenize(["a red circle", "red circle, a", "red"], 32))
  h = np.asarray(text.word_hashes(tokens, 6))
  assert h[0, 1] == h[1, 3]  # 'a' first or last
  assert h[0, 2] == h[1, 1] == h[2, 1]  # 'red'
  assert h[0, 3] != h[1, 2]  # 'circle' vs 'circle,'
  assert len({int(v) for v in h[0, :4]}) == 4


@pytest.mark.parametrize("kw", [dict(), dict(max_words=0, downsample=2), dict(max_words=0, conv_kernel=0)])
def test_padding_does_not_change_the_output(kw):
  enc = _encoder(**kw)
  short = jnp.asarray(tokens_lib.tokenize(["a large red circle in the top left", ""], 40))
  longer = jnp.asarray(tokens_lib.tokenize(["a large red circle in the top left", ""], 48))
  params = nn.unbox(enc.init(jax.random.key(0), longer))
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
  a, b = enc.apply(params, short), enc.apply(params, longer)
  np.testing.assert_allclose(a["pooled"], b["pooled"], atol=1e-5)
  n = a["context"].shape[1] if kw.get("max_words", 8) == 0 else 8
  np.testing.assert_allclose(a["context"][:, :n], b["context"][:, :n], atol=1e-5)


def test_captions_are_told_apart_and_lengths_checked():
  enc = _encoder()
  tokens = jnp.asarray(tokens_lib.tokenize(["a red circle", "a blue circle"], 48))
  params = nn.unbox(enc.init(jax.random.key(0), tokens))
  out = enc.apply(params, tokens)
  assert out["context"].shape == (2, 8, 32) and out["pooled"].shape == (2, 32)
  assert float(jnp.abs(out["pooled"][0] - out["pooled"][1]).max()) > 1e-3
  with pytest.raises(ValueError, match="max_len"):
    enc.apply(params, jnp.zeros((1, 64), jnp.int32))
  with pytest.raises(ValueError, match="unknown text encoder"):
    text.build(dict(encoder="t5"))
