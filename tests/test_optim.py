import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdiff.train import optim

CFG = dict(lr=1e-3, warmup_steps=4, schedule="constant", end_lr_factor=0.0, b1=0.9, b2=0.999, eps=1e-8,
           weight_decay=0.1, grad_clip=1.0, ema_decay=0.999, ema_warmup=True, mu_dtype="", trainable="")


def test_schedules_by_hand():
  f = optim.learning_rate(CFG, 100)
  np.testing.assert_allclose([f(i) for i in range(6)], [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
  g = optim.learning_rate(dict(CFG, schedule="cosine", end_lr_factor=0.1), 100)
  # Cosine from update 3 (lr) to update 99 (lr * 0.1): halfway it is the mean of the two.
  np.testing.assert_allclose(g(3), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(g(51), 1e-3 * (0.1 + 0.9 * 0.5), rtol=1e-5)
  np.testing.assert_allclose(g(99), 1e-4, rtol=1e-5)
  with pytest.raises(ValueError, match="optim.schedule"):
    optim.learning_rate(dict(CFG, schedule="step"), 10)


def test_weight_decay_only_on_kernels_and_clipping():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)}}
  tx = optim.make_optimizer(dict(CFG, warmup_steps=1, lr=0.1, weight_decay=0.5), 10)
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, state = tx.update(zero, state, params)
  # Zero gradient: only decoupled weight decay moves anything, and only kernels.
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)
  assert int(optim.applied_updates(state)) == 1
  # Clipping: a huge gradient is scaled to global norm 1 before Adam (direction kept).
  clip = optax.clip_by_global_norm(1.0)
  big = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
  clipped, _ = clip.update(big, clip.init(params))
  np.testing.assert_allclose(optax.tree.norm(clipped), 1.0, rtol=1e-6)


def test_ema_decay_warmup():
  assert float(optim.ema_decay(CFG, jnp.asarray(0))) == pytest.approx(0.1)
  assert float(optim.ema_decay(CFG, jnp.asarray(90))) == pytest.approx(0.91)
  assert float(optim.ema_decay(CFG, jnp.asarray(10**6))) == pytest.approx(0.999)
  assert float(optim.ema_decay(dict(CFG, ema_warmup=False), jnp.asarray(0))) == pytest.approx(0.999)


def test_bfloat16_first_moment():
  """optim.mu_dtype='bfloat16' stores Adam's first moment in bfloat16 (second moment and
  parameters stay float32) and follows the float32 trajectory to bfloat16 precision."""
  params = {"kernel": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8), "bias": jnp.zeros(8)}
  grad = lambda p: jax.tree.map(lambda x: jnp.sin(3.0 * x) + 0.1, p)
  runs = {}
  for mu_dtype in ("", "bfloat16"):
    tx = optim.make_optimizer(dict(CFG, warmup_steps=1, mu_dtype=mu_dtype), 10)
    p, state = params, tx.init(params)
    for _ in range(5):
      updates, state = tx.update(grad(p), state, p)
      p = optax.apply_updates(p, updates)
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    runs[mu_dtype] = p, adam
  (p32, adam32), (p16, adam16) = runs[""], runs["bfloat16"]
  assert {x.dtype for x in jax.tree.leaves(adam32.mu)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(adam16.mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves((adam16.nu, p16))} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(adam16.mu["kernel"].astype(jnp.float32), adam32.mu["kernel"], rtol=1e-2, atol=1e-3)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), p32, params)
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), p16, p32)
  assert diff["kernel"] < 0.02 * moved["kernel"] and diff["kernel"] > 0  # close, yet bf16 did act
