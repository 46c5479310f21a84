"""DiT (adaLN-Zero) conditioned on pooled text, on the embedded shapes data, pixel space.

Default (GPU/TPU), 256x256, DiT-B/8:
  python -m jdiff.main --config=configs/dit_256.py --workdir=runs/dit_256
CPU demo (24x24, DiT-S/4 shapes at width 128 and depth 4, the MMDiT demo's budget):
  python -m jdiff.main --config=configs/dit_256.py:cpu --workdir=runs/dit_demo
"""

from jdiff import config as config_lib

VARIANTS = ("gpu", "cpu", "test")


def get_config(arg: str | None = None):
  variant = arg or "gpu"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/dit_256.py; expected one of {VARIANTS}")
  c = config_lib.base()
  c.model.update(name="dit", variant="B/8", patch_size=8, qk_norm=False)
  if variant == "gpu":
    return c
  c.model.update(dtype="float32", scan=False, remat="none", patch_size=4, pos_embed_max_size=16)
  c.text.update(dtype="float32", width=128, depth=2, num_heads=4)
  c.data.update(resolution=24, prefetch=64)
  c.optim.update(lr=1e-3, warmup_steps=100, ema_decay=0.999)
  c.diffusion.shift.base_seq_len = 36
  c.sample.update(num_steps=20, cfg_scale=3.0, batch_size=8)
  c.eval.update(num_samples=48, num_steps=20, cfg_scale=3.0)
  if variant == "cpu":
    # As in configs/mmdit_256.py:cpu: a frozen byte encoder (a jointly trained one erases the
    # position words, docs/notes.md) and clean-image prediction.
    c.optim.trainable = "denoiser/.*"
    c.diffusion.prediction = "x0"
    c.model.update(variant="S/4", depth=4, width=128, num_heads=2)
    c.train.update(batch_size=32, num_steps=4000, log_every=100, checkpoint_every=1000,
                   sample_every=1000, keep_checkpoints=2)
  else:  # test
    c.model.update(variant="S/4", depth=2, width=64, num_heads=2, pos_embed_max_size=8)
    c.text.update(width=32, depth=1, num_heads=2, max_len=32)
    c.data.resolution = 16
    c.diffusion.shift.base_seq_len = 16
    c.train.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=2, sample_every=4)
    c.sample.update(num_steps=2, batch_size=4)
    c.eval.update(num_samples=4, num_steps=2, at_end=False)
  return c
