import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import models
from jdiff.models import dit, layers, mmdit

from helpers import (TINY_DIT_CLASS, TINY_DIT_TEXT, TINY_FLUX, TINY_MMDIT, benchmark_module, block_groups, init,
                     inputs, perturb, to_scanned, to_unrolled)

CONFIGS = {"mmdit": TINY_MMDIT, "dit_text": TINY_DIT_TEXT, "dit_class": TINY_DIT_CLASS, "flux": TINY_FLUX}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shapes_at_several_resolutions_from_one_set_of_weights(name):
  cfg = CONFIGS[name]
  model, params = init(cfg, *inputs(cfg))
  for size in [(16, 16), (32, 32), (8, 24), (32, 16)]:
    x, t, cond = inputs(cfg, batch=3, size=size)
    out = jax.jit(model.apply)(params, x, t, **cond)
    chex.assert_shape(out, x.shape)
    chex.assert_type(out, jnp.float32)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_is_exactly_zero_at_init(name):
  cfg = CONFIGS[name]
  x, t, cond = inputs(cfg, batch=3)
  model, params = init(cfg, x, t, cond)
  out = jax.jit(model.apply)(params, x, t, **cond)
  assert np.array_equal(np.asarray(out), np.zeros(x.shape, np.float32))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("remat", ["none", "full", "dots", "dots_no_batch_attention", "dots_no_batch_attention_mlp"])
def test_scanned_equals_unrolled(name, remat):
  cfg = CONFIGS[name]
  x, t, cond = inputs(cfg, batch=2)
  unrolled, params = init(cfg, x, t, cond)
  params = perturb(params)
  groups = block_groups(cfg, unrolled)
  scanned = models.build(dict(cfg, scan=True, remat=remat))
  scanned_params = {"params": to_scanned(params["params"], groups)}
  ref = jax.jit(unrolled.apply)(params, x, t, **cond)
  out = jax.jit(scanned.apply)(scanned_params, x, t, **cond)
  assert float(jnp.abs(ref).max()) > 1e-2
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  # The scanned layout has the same weights under a leading layers axis.
  back = to_unrolled(scanned_params["params"], groups)
  chex.assert_trees_all_equal(back, params["params"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_jit_equals_no_jit(name):
  cfg = CONFIGS[name]
  x, t, cond = inputs(cfg, batch=2)
  model, params = init(cfg, x, t, cond)
  params = perturb(params)
  eager = model.apply(params, x, t, **cond)
  jitted = jax.jit(lambda p, x, t, c: model.apply(p, x, t, **c))(params, x, t, cond)
  chex.assert_trees_all_close(eager, jitted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_attention_saving_remat_keeps_cudnn_forward_outputs(monkeypatch, scan):
  """remat='dots_no_batch_attention' keeps cuDNN attention's forward outputs for its
  backward: the gradient binds the forward kernel as often as the forward pass does, where
  dots_no_batch binds it again to recompute it. Only traced, so no GPU is needed."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

  monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 91000)
  cfg = dict(TINY_MMDIT, dtype="bfloat16", attention="cudnn", scan=scan)
  x, t, cond = inputs(cfg, text_len=6)  # 64 + 6 tokens: cuDNN's training kernel wants an even length
  _, params = init(dict(cfg, attention="xla"), x, t, cond)
  collect = benchmark_module("gemm_ceiling").collect_matmuls  # counts through scans and remat
  kernel = lambda f: sum(collect(jax.make_jaxpr(f)(params).jaxpr, ("dot_product_attention_fwd_wrapper",)).values())
  counts = {}
  for remat in ("dots_no_batch", "dots_no_batch_attention"):
    model = models.build(dict(cfg, remat=remat))
    loss = lambda p: jnp.mean(model.apply(p, x, t, **cond).astype(jnp.float32) ** 2)
    counts[remat] = (kernel(loss), kernel(jax.grad(loss)))
  forward = counts["dots_no_batch"][0]
  assert forward == 2  # two blocks (scanned: the scan body, and the last block outside it)
  assert counts["dots_no_batch_attention"] == (forward, forward)
  assert counts["dots_no_batch"][1] > forward  # recomputed in the backward


def test_gradients_match_between_scan_and_unrolled():
  cfg = TINY_MMDIT
  x, t, cond = inputs(cfg)
  unrolled, params = init(cfg, x, t, cond)
  params = perturb(params)
  scanned = models.build(dict(cfg, scan=True, remat="full"))
  loss = lambda m, p: jnp.mean(m.apply(p, x, t, **cond) ** 2)
  g_unrolled = jax.jit(jax.grad(lambda p: loss(unrolled, p)))(params)
  g_scanned = jax.jit(jax.grad(lambda p: loss(scanned, p)))(
      {"params": layers.stack_unrolled(params["params"], "blocks", 1)})
  g_scanned = {"params": layers.unstack_scanned(g_scanned["params"], "blocks")}
  chex.assert_trees_all_close(g_scanned, g_unrolled, atol=1e-5, rtol=1e-4)


def test_every_parameter_has_logical_axis_names():
  for cfg in CONFIGS.values():
    x, t, cond = inputs(cfg)
    boxed = jax.jit(models.build(dict(cfg, scan=True)).init)(jax.random.key(0), x, t, **cond)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
      assert isinstance(leaf, nn.LogicallyPartitioned), leaf
      assert len(leaf.names) == leaf.value.ndim and all(isinstance(n, str) for n in leaf.names)


def test_bf16_compute_with_fp32_params():
  cfg = dict(TINY_MMDIT, dtype="bfloat16", param_dtype="float32")
  x, t, cond = inputs(cfg)
  model, params = init(cfg, x, t, cond)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  params = perturb(params)
  out = jax.jit(model.apply)(params, x, t, **cond)
  ref = jax.jit(models.build(TINY_MMDIT).apply)(params, x, t, **cond)
  chex.assert_type(out, jnp.float32)
  assert np.isfinite(np.asarray(out)).all()
  # bf16 keeps ~3 significant digits; the two paths agree to that precision.
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < 0.05


def test_size_tables():
  assert dit.parse_variant("XL/2") == dict(depth=28, width=1152, num_heads=16, patch_size=2)
  assert dit.parse_variant("S/8") == dict(depth=12, width=384, num_heads=6, patch_size=8)
  assert mmdit.parse_variant("d24") == dict(depth=24, width=1536, num_heads=24)
  for bad in ("XL/3", "M/2", "XL"):
    with pytest.raises(ValueError, match="DiT variant"):
      dit.parse_variant(bad)
  with pytest.raises(ValueError, match="MMDiT variant"):
    mmdit.parse_variant("24")
  with pytest.raises(ValueError, match="unknown model"):
    models.build(dict(name="unet"))


def test_mmdit_parameter_count_matches_sd3_formula():
  """d=2 MMDiT: count by hand from SD3's block structure."""
  cfg = TINY_MMDIT
  x, t, cond = inputs(cfg)
  _, params = init(cfg, x, t, cond)
  n = sum(p.size for p in jax.tree.leaves(params))
  w, p, c = 128, 2, 4
  lin = lambda i, o: i * o + o
  full_block = 2 * (lin(w, 6 * w) + 4 * lin(w, w) + 2 * 64 + lin(w, 4 * w) + lin(4 * w, w))
  last_block = lin(w, 6 * w) + lin(w, 2 * w) + 2 * 3 * lin(w, w) + 4 * 64 + lin(w, w) + lin(w, 4 * w) + lin(4 * w, w)
  embed = lin(p * p * c, w) + lin(256, w) + lin(w, w) + lin(12, w) + lin(w, w) + lin(24, w)
  final = lin(w, 2 * w) + lin(w, p * p * c)
  assert n == full_block + last_block + embed + final


def test_patchify_round_trip_and_layout():
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
  tokens = layers.patchify(x, 2)
  chex.assert_shape(tokens, (2, 24, 12))
  # Token (row 1, col 2) holds pixels [2:4, 4:6] in (p_row, p_col, C) order.
  np.testing.assert_array_equal(tokens[:, 1 * 6 + 2], x[:, 2:4, 4:6, :].reshape(2, -1))
  np.testing.assert_array_equal(layers.unpatchify(tokens, (4, 6), 2), x)
  with pytest.raises(ValueError, match="not divisible by the patch size"):
    layers.patchify(x, 5)


def test_position_table_is_a_centre_crop_of_the_maximum_grid():
  full = layers.cropped_sincos_2d(64, (8, 8), 8, None).reshape(8, 8, 64)
  crop = layers.cropped_sincos_2d(64, (4, 6), 8, None).reshape(4, 6, 64)
  np.testing.assert_array_equal(crop, full[2:6, 1:7])
  # Columns in the first half of the channels, rows in the second; unit spacing.
  np.testing.assert_allclose(full[3, 5, 0], np.sin(5.0))
  np.testing.assert_allclose(full[3, 5, 16], np.cos(5.0))
  np.testing.assert_allclose(full[3, 5, 32], np.sin(3.0))
  # SD3 spacing: coordinates scaled by base/max.
  sd3 = layers.cropped_sincos_2d(64, (8, 8), 8, 4).reshape(8, 8, 64)
  np.testing.assert_allclose(sd3[3, 5, 0], np.sin(2.5), rtol=1e-6)
  with pytest.raises(ValueError, match="pos_embed_max_size"):
    layers.cropped_sincos_2d(64, (10, 4), 8, None)


def test_timestep_features_by_hand():
  f = layers.timestep_features(jnp.array([500.0]), dim=4, max_period=10000.0)
  freqs = np.array([1.0, np.exp(-np.log(10000.0) / 2)])
  np.testing.assert_allclose(f[0], np.concatenate([np.cos(500 * freqs), np.sin(500 * freqs)]), rtol=1e-5)


def test_bad_inputs_fail_clearly():
  cfg = TINY_MMDIT
  x, t, cond = inputs(cfg)
  model, params = init(cfg, x, t, cond)
  with pytest.raises(ValueError, match="input channels"):
    model.apply(params, x[..., :3], t, **cond)
  with pytest.raises(ValueError, match="context"):
    model.apply(params, x, t, context=cond["context"][..., :5], pooled=cond["pooled"])
  with pytest.raises(ValueError, match="attention implementation"):
    layers.dot_product_attention(jnp.ones((1, 2, 1, 4)), jnp.ones((1, 2, 1, 4)), jnp.ones((1, 2, 1, 4)), "flash")
  with pytest.raises(ValueError, match="remat policy"):
    models.build(dict(cfg, remat="some")).init(jax.random.key(0), x, t, **cond)


def test_class_null_label_changes_output():
  cfg = TINY_DIT_CLASS
  x, t, cond = inputs(cfg)
  model, params = init(cfg, x, t, cond)
  params = perturb(params)
  a = jax.jit(model.apply)(params, x, t, labels=jnp.array([1, 1]))
  b = jax.jit(model.apply)(params, x, t, labels=jnp.array([10, 10]))  # the null label
  assert float(jnp.abs(a - b).max()) > 1e-3


def test_rope_tables_and_rotation_by_hand():
  ids = np.array([[0, 0, 0], [0, 2, 3]])
  cos, sin = layers.rope_tables(ids, (2, 4, 2), theta=100.0)
  chex.assert_shape(cos, (2, 8))
  # Token 1: axis 1 (row 2) has frequencies 1 and 100^-0.5, each on an interleaved pair;
  # axis 2 (column 3) frequency 1.
  angles = np.array([0, 0, 2, 2, 2 * 0.1, 2 * 0.1, 3, 3])
  np.testing.assert_allclose(cos[1], np.cos(angles), rtol=1e-6)
  np.testing.assert_allclose(sin[1], np.sin(angles), rtol=1e-6)
  np.testing.assert_array_equal(cos[0], np.ones(8))
  x = jax.random.normal(jax.random.key(0), (1, 2, 1, 8))
  y = np.asarray(layers.apply_rope(x, (cos, sin)))
  a, b = np.asarray(x[0, 1, 0, 2]), np.asarray(x[0, 1, 0, 3])
  np.testing.assert_allclose(y[0, 1, 0, 2:4], [a * np.cos(2) - b * np.sin(2), b * np.cos(2) + a * np.sin(2)],
                             rtol=1e-5)
  np.testing.assert_allclose(y[0, 0], x[0, 0], rtol=1e-6)  # position 0: identity
  # Rotations keep norms, and attention logits depend only on position differences.
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_splash_attention_equals_xla_forward_and_backward():
  """The Pallas splash kernel (interpret mode off TPU) with a length that needs padding."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 150, 2, 16), np.float32)) for _ in range(3))
  f = lambda impl: lambda q, k, v: layers.dot_product_attention(q, k, v, impl)
  np.testing.assert_allclose(f("splash:128")(q, k, v), f("xla")(q, k, v), atol=2e-6)
  loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(f(impl)(q, k, v)))
  g_splash = jax.grad(loss("splash:128"), argnums=(0, 1, 2))(q, k, v)
  g_xla = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  chex.assert_trees_all_close(g_splash, g_xla, atol=2e-5)
  with pytest.raises(ValueError, match="multiples of 128"):
    layers.dot_product_attention(q, k, v, "splash:100")


def test_mmdit_with_splash_attention_equals_xla():
  cfg = TINY_MMDIT
  x, t, cond = inputs(cfg, batch=2)
  model, params = init(cfg, x, t, cond)
  params = perturb(params)
  ref = jax.jit(model.apply)(params, x, t, **cond)
  out = jax.jit(models.build(dict(cfg, attention="splash")).apply)(params, x, t, **cond)
  chex.assert_trees_all_close(out, ref, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_lora_merge_equals_the_adapted_forward(scan):
  """A model built with a LoRA field (the public API: models.build(cfg, lora=...)) carries
  adapters on the targeted layers only; its forward is the plain model's at B = 0, differs
  once B is trained, and equals the plain model on the merged kernels."""
  cfg = dict(TINY_MMDIT, scan=scan)
  x, t, cond = inputs(cfg, batch=2)
  spec = layers.LoRA(rank=3, alpha=6.0)
  model, plain_model = models.build(cfg, lora=spec), models.build(cfg)
  assert model.lora == spec and plain_model.lora is None
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), x, t, **cond))["params"]
  names = {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  lora = sorted(n for n in names if "lora_" in n)
  assert any("x_qkv/q/lora_a" in n for n in lora) and any("x_mlp/fc2/lora_b" in n for n in lora)
  assert not any("adaLN" in n or "patch_embed" in n for n in lora)  # only the targeted layers
  # At init (B = 0) the adapted model is its base: same output as the plain model.
  with_b0 = jax.jit(lambda params: jax.tree_util.tree_map_with_path(
      lambda p, v: v if "lora_b" in str(p[-1]) else v + 0.05, params))(params)
  adapted0 = jax.jit(model.apply)({"params": with_b0}, x, t, **cond)
  chex.assert_trees_all_close(adapted0, jax.jit(plain_model.apply)({"params": with_b0}, x, t, **cond), atol=1e-6)
  params = perturb(params, scale=0.1)
  adapted = jax.jit(model.apply)({"params": params}, x, t, **cond)
  merged = layers.merge_lora(params, spec)
  assert not any("lora_" in "/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(merged))
  plain = jax.jit(plain_model.apply)({"params": merged}, x, t, **cond)
  chex.assert_trees_all_close(plain, adapted, atol=1e-5, rtol=1e-5)
  # The adapters matter: the plain model on the unmerged kernels gives another output.
  without = jax.jit(plain_model.apply)({"params": params}, x, t, **cond)
  assert float(jnp.abs(without - adapted).max()) > 1e-3


def test_lora_reaches_every_targeted_layer_of_every_model():
  """The lora field is passed to every layer a model builds: with targets matching all Dense
  layers, every kernel of DiT, MMDiT and Flux has an adapter beside it."""
  spec = layers.LoRA(rank=2, targets=r".*")
  for cfg in (TINY_DIT_TEXT, TINY_MMDIT, TINY_FLUX):
    x, t, cond = inputs(cfg, batch=1)
    params = nn.unbox(jax.jit(models.build(cfg, lora=spec).init)(jax.random.key(0), x, t, **cond))["params"]
    paths = ["/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    kernels = {p.rsplit("/", 1)[0] for p in paths if p.endswith("/kernel")}
    adapted = {p.rsplit("/", 1)[0] for p in paths if p.endswith("/lora_a")}
    assert kernels and kernels == adapted, (cfg["name"], sorted(kernels - adapted))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embed_one_hot_equals_gather_with_repeated_ids(dtype):
  """The accelerator path (one-hot matmul) and the CPU path (gather) of layers.embed give the
  same rows and the same table gradient (a scatter-add over repeated ids)."""
  table = jax.random.normal(jax.random.key(0), (37, 8))
  ids = jax.random.randint(jax.random.key(1), (4, 11), 0, 5)  # few distinct ids: many repeats
  cot = jax.random.normal(jax.random.key(2), (4, 11, 8))

  def run(one_hot):
    f = lambda t: layers.embed(t, ids, dtype, one_hot=one_hot)
    out, vjp = jax.vjp(f, table)
    return out, vjp(cot.astype(out.dtype))[0]

  (out_g, grad_g), (out_m, grad_m) = run(False), run(True)
  assert out_m.dtype == out_g.dtype == dtype
  chex.assert_trees_all_equal(out_m, out_g)
  np.testing.assert_array_equal(out_g, table.astype(dtype)[ids])
  tol = 1e-6 if dtype == jnp.float32 else 2e-2
  chex.assert_trees_all_close(grad_m, grad_g, rtol=tol, atol=tol)
  assert float(jnp.abs(grad_g[5:]).max()) == 0.0  # rows never looked up get no gradient


def _assert_same_function(out, vjp, out_ref, vjp_ref, cot, dtype):
  """Outputs (arrays or tuples of them) of the same dtypes and close (1e-5 in float32, 2e-2
  in bfloat16), and the gradients for cotangent `cot` of the same dtypes and close to 4x that."""
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  f32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)
  chex.assert_trees_all_equal_dtypes(out, out_ref)
  chex.assert_trees_all_close(f32(out), f32(out_ref), rtol=tol, atol=tol)
  grads, grads_ref = vjp(cot), vjp_ref(cot)
  chex.assert_trees_all_equal_dtypes(grads, grads_ref)
  chex.assert_trees_all_close(f32(grads), f32(grads_ref), rtol=4 * tol, atol=4 * tol)


@pytest.mark.parametrize("dtype,rows", [(jnp.float32, "plain"), (jnp.bfloat16, "plain"),
                                        (jnp.float32, "offset"), (jnp.float32, "outlier")])
def test_norm_modulate_equals_layer_norm_then_modulate(dtype, rows):
  """layers.norm_modulate (hand-written backward) is flax's LayerNorm without parameters
  followed by x * (1 + scale) + shift: output and the gradients of x, shift and scale.
  Also for rows whose mean is 10 standard deviations (offset) and rows with one channel
  150 standard deviations out (outlier, as residual streams have): statistics computed in
  one pass (mean(x^2) - mean(x)^2) miss the gradient tolerance on the offset rows."""
  keys = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(keys[0], (2, 7, 32)) * 2 + {"plain": 0.5, "offset": 20.0, "outlier": 0.5}[rows]
  if rows == "outlier":
    x = x.at[..., 3].set(300.0)
  x = x.astype(dtype)
  shift, scale = (0.3 * jax.random.normal(k, (2, 32)) for k in keys[1:3])
  cot = jax.random.normal(keys[3], (2, 7, 32)).astype(dtype)
  ln = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, use_fast_variance=False)
  ref = lambda x, shift, scale: layers.modulate(ln.apply({}, x.astype(jnp.float32)), shift, scale).astype(dtype)
  ours = lambda x, shift, scale: layers.norm_modulate(x, shift, scale, dtype)
  out, vjp = jax.vjp(ours, x, shift, scale)
  out_ref, vjp_ref = jax.vjp(ref, x, shift, scale)
  assert out.dtype == dtype
  _assert_same_function(out, vjp, out_ref, vjp_ref, cot, dtype)
  # Several (shift, scale) pairs on one x (SD3.5's dual attention): one normalisation, the
  # outputs and gradients of separate calls (x's gradient summed over the pairs).
  shift2, scale2 = shift[::-1], 0.5 - scale
  many = lambda x, a, b, c, d: layers.norm_modulate_many(x, (a, b), (c, d), dtype)
  separate = lambda x, a, b, c, d: (ref(x, a, c), ref(x, b, d))
  out, vjp = jax.vjp(many, x, shift, shift2, scale, scale2)
  out_ref, vjp_ref = jax.vjp(separate, x, shift, shift2, scale, scale2)
  _assert_same_function(out, vjp, out_ref, vjp_ref, (cot, cot[:, ::-1]), dtype)


@pytest.mark.parametrize("x_dtype,dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16),
                                           (jnp.float32, jnp.bfloat16)])
def test_rms_norm_equals_flax(x_dtype, dtype):
  """layers.RMSNorm (hand-written backward) computes what flax's nn.RMSNorm does: output,
  input gradient and scale gradient, with the same parameter."""
  x, cot = (jax.random.normal(k, (2, 5, 3, 16)) * 3 for k in jax.random.split(jax.random.key(1), 2))
  x = x.astype(x_dtype)
  ours = layers.RMSNorm(eps=1e-6, dtype=dtype)
  ref = nn.RMSNorm(epsilon=1e-6, dtype=dtype)
  params = {"scale": 1.0 + 0.1 * jax.random.normal(jax.random.key(2), (16,))}
  assert jax.tree.map(jnp.shape, nn.unbox(ours.init(jax.random.key(0), x)["params"])) == {"scale": (16,)}
  run = lambda m: jax.vjp(lambda p, x: m.apply({"params": p}, x), params, x)
  (out, vjp), (out_ref, vjp_ref) = run(ours), run(ref)
  assert out.dtype == out_ref.dtype == dtype
  _assert_same_function(out, vjp, out_ref, vjp_ref, cot.astype(dtype), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_attention_layout_equals_jax_attention(dtype):
  """On CPU, attention runs in [B, N, T, H] layout (layers.attention._attention_heads_major); it computes
  what jax.nn.dot_product_attention does, forward and backward."""
  q, k, v, cot = (jax.random.normal(key, (2, 40, 3, 16)).astype(dtype) for key in jax.random.split(jax.random.key(0), 4))
  k = k[:, :24]
  v = v[:, :24]
  ours = lambda q, k, v: layers.dot_product_attention(q, k, v, "xla")
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  out, vjp = jax.vjp(ours, q, k, v)
  out_ref, vjp_ref = jax.vjp(ref, q, k, v)
  assert out.dtype == out_ref.dtype == dtype and out.shape == (2, 40, 3, 16)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  chex.assert_trees_all_close(out, out_ref, rtol=tol, atol=tol)
  chex.assert_trees_all_close(vjp(cot), vjp_ref(cot), rtol=tol, atol=tol)


def test_match_layout_moves_weights_between_scanned_and_unrolled():
  cfg = dict(TINY_MMDIT, depth=4)
  x, t, cond = inputs(cfg)
  model, params = init(cfg, x, t, cond)
  groups = block_groups(cfg, model)
  scanned = to_scanned(params["params"], groups)
  # Either way round, and a tree already in the target layout is returned as it is.
  chex.assert_trees_all_equal(layers.match_layout(scanned, params["params"]), params["params"])
  chex.assert_trees_all_equal(layers.match_layout(params["params"], scanned), scanned)
  chex.assert_trees_all_equal(layers.match_layout(scanned, scanned), scanned)
  # Shapes are enough to say the layout (what the trainer passes).
  shapes = jax.eval_shape(lambda: params["params"])
  chex.assert_trees_all_equal(layers.match_layout(scanned, shapes), params["params"])


def test_remat_mlp_policy_saves_the_gelu_output_and_norm_stats_of_every_block():
  """dots_no_batch_attention_mlp keeps each rematerialised block's MLP activation (fc2's
  input) and its adaLN LayerNorms' statistics for the backward; dots_no_batch_attention
  recomputes them."""
  from jax._src import ad_checkpoint  # pylint: disable=g-import-not-at-top

  cfg = dict(TINY_MMDIT, depth=3, attention="xla")
  x, t, cond = inputs(cfg)
  counts = {}
  for remat in ("dots_no_batch_attention", "dots_no_batch_attention_mlp"):
    for scan in (False, True):
      model = models.build(dict(cfg, remat=remat, scan=scan))
      params = model.init(jax.random.key(0), x, t, **cond)
      residuals = ad_checkpoint.saved_residuals(lambda p, m=model: m.apply(p, x, t, **cond).sum(), params)
      counts[remat, scan] = (len(residuals), sum("'mlp_activation'" in d for _, d in residuals),
                             sum("'norm_stats'" in d for _, d in residuals))
  # Per rematerialised block, image and text stream: one MLP activation, and mean and 1/sigma
  # of the attention's and the MLP's LayerNorms. The last block and the output norm are not
  # remat'd: their 8 statistics are residuals under either policy.
  base, mlp = counts["dots_no_batch_attention", False], counts["dots_no_batch_attention_mlp", False]
  assert base[1:] == (0, 8)
  # Unrolled: two rematerialised blocks.
  assert mlp == (base[0] + 4 + 16, 4, 8 + 16)
  # Scanned: those of the scan body, stacked over layers (named as scan outputs).
  base, mlp = counts["dots_no_batch_attention", True], counts["dots_no_batch_attention_mlp", True]
  assert mlp[0] == base[0] + 2 + 8


@pytest.mark.parametrize("remat,scan", [("full", False), ("dots_no_batch_attention_mlp", False),
                                        ("dots_no_batch_attention_mlp", True), ("dots_no_batch", True)])
@pytest.mark.parametrize("name", ["mmdit", "flux"])
def test_remat_gradients_equal_no_remat(name, remat, scan):
  """Rematerialised blocks, unrolled or scanned, give the gradients of the plain model (here
  the kept adaLN statistics, which enter the normalisation under stop_gradient, must not
  lose x's gradient through them), for MMDiT and for Flux's double and single blocks."""
  cfg = dict(TINY_MMDIT, depth=3) if name == "mmdit" else dict(TINY_FLUX, depth=2, single_depth=2)
  cfg = dict(cfg, attention="xla")
  x, t, cond = inputs(cfg, batch=2)
  plain, params = init(dict(cfg, remat="none"), x, t, cond)
  params = perturb(params)
  model = models.build(dict(cfg, remat=remat, scan=scan))
  groups = block_groups(cfg, plain) if scan else []
  w = jax.random.normal(jax.random.key(5), x.shape)
  loss = lambda m, p, x: jnp.sum(w * m.apply(p, x, t, **cond))
  g_plain = jax.jit(jax.grad(lambda p, x: loss(plain, p, x), argnums=(0, 1)))(params, x)
  g_model = jax.jit(jax.grad(lambda p, x: loss(model, p, x), argnums=(0, 1)))(
      {"params": to_scanned(params["params"], groups)}, x)
  g_model = ({"params": to_unrolled(g_model[0]["params"], groups)}, g_model[1])
  assert max(float(np.abs(g).max()) for g in jax.device_get(jax.tree.leaves(g_plain))) > 1e-2
  chex.assert_trees_all_close(g_model, g_plain, atol=1e-5, rtol=1e-5)


def test_position_interpolation_keeps_each_token_in_its_place_in_the_frame():
  """pos_embed_interpolate=G: at the G grid the table is SD3's centred crop; at any other grid
  token i of n takes the coordinate of fractional place (i + 1/2) / n within the G crop (so
  the corner tokens of a 4 grid sit 1/8 of a G=3 token outside the G grid's corner tokens)."""
  from jdiff.models.layers import embeddings  # pylint: disable=g-import-not-at-top
  dim, max_size = 16, 10
  crop = embeddings.cropped_sincos_2d(dim, (3, 3), max_size, None)
  np.testing.assert_array_equal(embeddings.cropped_sincos_2d(dim, (3, 3), max_size, None, 3), crop)
  table = embeddings.cropped_sincos_2d(dim, (4, 2), max_size, None, 3)
  rows = 3 + (np.arange(4) + 0.5) * 3 / 4 - 0.5  # the 3 crop starts at (10 - 3) // 2 = 3
  cols = 3 + (np.arange(2) + 0.5) * 3 / 2 - 0.5
  want = np.concatenate([embeddings.sincos_1d(dim // 2, np.tile(cols, 4)),
                         embeddings.sincos_1d(dim // 2, np.repeat(rows, 2))], axis=1)
  np.testing.assert_allclose(table, want, atol=1e-6)
  assert rows[0] == 2.875 and rows[-1] == 5.125 and cols.tolist() == [3.25, 4.75]
  # SD3's scaled coordinates (base_size) scale the interpolated ones alike.
  np.testing.assert_allclose(embeddings.cropped_sincos_2d(dim, (3, 3), max_size, 5, 3),
                             embeddings.cropped_sincos_2d(dim, (3, 3), max_size, 5), atol=1e-6)
  # The model field reaches the table: the same params give other outputs at a new grid only.
  cfg = dict(TINY_MMDIT, width=32, num_heads=2, patch_size=4)
  cond = dict(context=jnp.ones((1, 4, 24)), pooled=jnp.ones((1, 12)))
  t = jnp.full((1,), 0.5)
  plain, params = init(cfg, jnp.ones((1, 12, 12, 4)), t, cond)
  params = perturb(params)
  interp = models.build(dict(cfg, pos_embed_interpolate=3))
  for side, same in ((12, True), (16, False)):
    x = jax.random.normal(jax.random.key(side), (1, side, side, 4))
    a, b = (jax.jit(m.apply)(params, x, t, **cond) for m in (plain, interp))
    assert np.array_equal(a, b) == same, side
