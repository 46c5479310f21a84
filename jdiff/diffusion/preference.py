"""Diffusion-DPO (Wallace et al., 2023) in the flow-matching parameterisation.

For a caption c with a preferred sample x^w and a rejected one x^l, both noised with the
same eps and t, let e(model, x) = w(t) mean((v_model(x_t) - (eps - x))^2) be the
velocity-space error (`flow.flow_loss`). With a frozen reference model,

    margin = [e(theta, x^w) - e(ref, x^w)] - [e(theta, x^l) - e(ref, x^l)]
    loss   = -log sigmoid(-beta * margin)

The policy lowers its error on x^w relative to the reference and raises it on x^l.
beta plays the role of the paper's beta*T (the time-step count is folded into it);
the DPO loss at margin 0 is log 2. Implicit accuracy = fraction with margin < 0.

DPO can satisfy the margin by raising both errors, the preferred one less (likelihood
displacement). DPO-Positive (Pal et al., 2024) adds lambda * max(0, e(theta, x^w) -
e(ref, x^w)) to the margin, so the preferred error may not rise above the reference's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dpo_loss(err_w: jax.Array, err_ref_w: jax.Array, err_l: jax.Array, err_ref_l: jax.Array,
             beta: float, positive: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-sample DPO loss [B] and diagnostics, from per-sample errors [B] (see module doc);
  positive: DPO-Positive's lambda (0: plain DPO)."""
  margin = (err_w - err_ref_w) - (err_l - err_ref_l)
  loss = -jax.nn.log_sigmoid(-beta * (margin + positive * jnp.maximum(err_w - err_ref_w, 0.0)))
  metrics = dict(margin=margin, implicit_accuracy=(margin < 0).astype(jnp.float32),
                 reward_w=-beta * (err_w - err_ref_w), reward_l=-beta * (err_l - err_ref_l))
  return loss, metrics
