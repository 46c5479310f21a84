"""Prints max |jdiff - reference| / max |reference| for every converted model, on the tiny
random models of tests/test_interop_*.py (float32, CPU). Needs the test extras.

  python benchmarks/parity_table.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import numpy as np, jax, jax.numpy as jnp, torch
import test_interop_sd3 as S, test_interop_flux as F, test_interop_text as T, test_interop_vae as V
from jdiff.interop import sd3, flux, clip as clip_io, t5 as t5_io, vae as vae_io
from jdiff.models import clip, t5, vae
rel = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
for v in S.VARIANTS:
  m = S.reference(v); c = dict(m.config); p = sd3.to_jdiff(c, S.state_dict(m)); a = S.inputs((8, 8))
  print("sd3", v, f"{rel(S.jdiff_forward(c, p, *a), S.torch_forward(m, *a)):.1e}")
for g in (False, True):
  m = F.reference(g); c = dict(m.config); p = flux.to_jdiff(c, F.state_dict(m)); a = F.inputs((8, 8))
  print("flux guidance" if g else "flux", f"{rel(F.jdiff_forward(c, p, a), F.torch_forward(m, a)):.1e}")
for case in T.CLIP_CASES:
  m = T.clip_reference(case); c = m.config.to_dict(); c["architectures"] = [type(m).__name__]
  p = clip_io.to_jdiff(c, T.state_dict(m)); ids = T.clip_ids()
  o = clip.CLIPText(**clip_io.model_kwargs(c)).apply({"params": jax.tree.map(jnp.asarray, p)}, jnp.asarray(ids))
  with torch.no_grad(): r = m(input_ids=torch.from_numpy(ids), output_hidden_states=True)
  print(case, f"{rel(o['hidden_states'][-2], r.hidden_states[-2]):.1e}")
for case in T.T5_CASES:
  m = T.t5_reference(case); c = m.config.to_dict(); p = t5_io.to_jdiff(c, T.state_dict(m))
  ids = np.random.default_rng(0).integers(0, 99, size=(2, 24))
  o = t5.T5Encoder(**t5_io.model_kwargs(c)).apply({"params": jax.tree.map(jnp.asarray, p)}, jnp.asarray(ids))
  with torch.no_grad(): r = m(input_ids=torch.from_numpy(ids)).last_hidden_state
  print(case, f"{rel(o['last_hidden_state'], r.numpy()):.1e}")
for case in V.CASES:
  m = V.reference(case); c = dict(m.config); k = vae_io.model_kwargs(c); mod = vae.AutoencoderKL(**k)
  p = {"params": jax.tree.map(jnp.asarray, vae_io.to_jdiff(c, V.state_dict(m)))}
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, 16, 24, 3)).astype(np.float32)
  mean, _ = mod.apply(p, jnp.asarray(x), method=mod.encode)
  with torch.no_grad(): d = m.encode(V.nchw(x)).latent_dist; dec = m.decode(d.mean).sample
  print("vae", case, f"encode {rel(mean, V.nhwc(d.mean)):.1e}", f"decode {rel(mod.apply(p, mean, method=mod.decode), V.nhwc(dec)):.1e}")
