"""Analytic FLOPs of a training step, by formula (the convention of MFU: matmuls and
attention, forward and backward, rematerialisation not counted): what jdiff.bench reports
as flops_per_step and what jdiff.study equalises across architectures."""

from __future__ import annotations


def _dense(tokens: float, d_in: float, d_out: float) -> float:
  return 2.0 * tokens * d_in * d_out


def _attention(batch: float, q_len: float, kv_len: float, width: float) -> float:
  # Q K^T and (softmax) V: two [q, head_dim] x [head_dim, kv] products per head.
  return 4.0 * batch * q_len * kv_len * width


def model_flops(networks, batch: int, image_tokens: int, text_trainable: bool = True) -> dict[str, float]:
  """Forward FLOPs of the denoiser and the byte text encoder, by formula, and a training
  step's (text_trainable=False: the frozen encoder runs forward only).

  With D the width, r the MLP ratio, N image tokens and M text tokens per sample:
    joint/double block  2(N+M)(4D^2 + 2rD^2)  [QKV + out, MLP; both streams]
                        + 4(N+M)^2 D          [attention over the joint sequence]
    MMDiT last block    2N(4D^2 + 2rD^2) + 2M(3D^2) + 4N(N+M)D   [text only gives K, V]
    Flux single block   2(N+M)((3 + r)D^2 + (1 + r)D^2) + 4(N+M)^2 D
                        [QKV and MLP-in from one input; one output projection of both]
    DiT block           2N(4D^2 + 2rD^2) + 4N^2 D
    stems               patch embed 2N p^2C D, output 2N D p^2C, context embed 2M C_ctx D;
                        per-sample adaLN and embedding MLPs are counted too.
  Training = 3 x forward (backward = 2 x forward); a frozen text encoder counts once.
  """
  m = networks.denoiser
  d, r = float(m.width), float(m.mlp_ratio)
  n = float(image_tokens)
  kind = type(m).__name__
  p2c = m.patch_size**2 * m.in_channels
  per_sample = _dense(1, 256, d) + _dense(1, d, d)  # timestep MLP
  if getattr(m, "pooled_dim", 0):
    per_sample += _dense(1, m.pooled_dim, d) + _dense(1, d, d)
  tok_block = lambda t: _dense(t, d, 4 * d) + 2 * _dense(t, d, r * d)  # QKV + out (4D^2) + MLP
  fwd = _dense(n, p2c, d) + _dense(n, d, p2c) + _dense(1, d, 2 * d)  # stems + final adaLN
  if kind == "DiT":
    fwd += m.depth * (tok_block(n) + _attention(1, n, n, d) + _dense(1, d, 6 * d))
    text_tokens = 0.0
  else:
    text_tokens = float(_text_len(networks))
    mt = text_tokens
    fwd += _dense(mt, m.context_dim, d)
    joint = tok_block(n + mt) + _attention(1, n + mt, n + mt, d) + 2 * _dense(1, d, 6 * d)
    if kind == "MMDiT":
      dual = min(getattr(m, "dual_attention_depth", 0), m.depth)
      last = tok_block(n) + _dense(mt, d, 3 * d) + _attention(1, n, n + mt, d) + _dense(1, d, 8 * d)
      fwd += (m.depth - 1) * joint + last + dual * (_dense(n, d, 4 * d) + _attention(1, n, n, d))
    else:  # Flux
      single = _dense(n + mt, d, 3 * d + r * d) + _dense(n + mt, d + r * d, d) + _attention(1, n + mt, n + mt, d)
      fwd += m.depth * joint + m.single_depth * (single + _dense(1, d, 3 * d))
      if m.guidance_embed:
        per_sample += _dense(1, 256, d) + _dense(1, d, d)
  fwd += per_sample
  text = _text_flops(networks)
  return dict(denoiser_forward=batch * fwd, text_forward=batch * text,
              train_step=batch * (3.0 * fwd + (3.0 if text_trainable else 1.0) * text), text_tokens=text_tokens)


def _text_len(networks) -> int:
  t = networks.text
  if t is None:
    meta = networks.cached
    return int(meta["null"]["context"].shape[0]) if meta is not None else 0
  return t.max_words if getattr(t, "max_words", 0) else t.max_len // max(1, getattr(t, "downsample", 1))


def _text_flops(networks) -> float:
  """The trainable byte encoder: blocks on its output tokens plus the byte-level stem."""
  t = networks.text
  if t is None:
    return 0.0
  d, length = float(t.width), float(_text_len(networks))
  block = _dense(length, d, 4 * d) + 2 * _dense(length, d, 4 * d) + _attention(1, length, length, d)
  stem = _dense(t.max_len, d * max(1, getattr(t, "conv_kernel", 0)), d)
  return t.depth * block + stem
