"""MMDiT (SD3-style) text-to-image on the embedded shapes data, pixel space.

Default (GPU/TPU), 256x256, d12, patch 8:
  python -m jdiff.main --config=configs/mmdit_256.py --workdir=runs/mmdit_256
CPU demo for a 2-core machine (README's first command), 24x24 (BENCHMARKS.md has its time):
  python -m jdiff.main --config=configs/mmdit_256.py:cpu --workdir=runs/demo
The same model trained five times longer, with a learning curve (README shows it):
  python -m jdiff.main --config=configs/mmdit_256.py:cpu_long --workdir=runs/demo_long
Seconds-long smoke run (tests):
  python -m jdiff.main --config=configs/mmdit_256.py:test --workdir=/tmp/jdiff_test
Real data: add --config.data.source=tfds --config.data.tfds_name=NAME (or arrayrecord).
"""

from jdiff import config as config_lib

VARIANTS = ("gpu", "cpu", "cpu_long", "test")


def get_config(arg: str | None = None):
  variant = arg or "gpu"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/mmdit_256.py; expected one of {VARIANTS}")
  c = config_lib.base()
  if variant == "gpu":
    return c

  # Small CPU runs: float32 everywhere, no scan/remat (depth is small), one device.
  c.model.update(dtype="float32", scan=False, remat="none")
  c.text.update(dtype="float32")
  c.data.update(prefetch=64)
  c.optim.update(lr=1e-3, warmup_steps=100, ema_decay=0.999)
  if variant in ("cpu", "cpu_long"):
    # Sized for 2 cores and about ten minutes: 24x24 pixels, patch 4 (36 image
    # tokens), width 128 with depth 4, byte text pooled into <= 16 word tokens.
    # The byte encoder stays at its random initialisation (a fixed hashed-word encoder):
    # trained jointly from scratch it learns to erase the position words before the
    # denoiser can use them, and the model ignores position (docs/notes.md). The network
    # predicts the clean image (loss still on the velocity): cleaner flat regions.
    c.optim.trainable = "denoiser/.*"
    c.diffusion.prediction = "x0"
    c.model.update(variant="d2", depth=4, patch_size=4, pos_embed_max_size=16)
    c.text.update(width=128, depth=2, num_heads=4)
    c.data.resolution = 24
    c.diffusion.shift.base_seq_len = 36  # s = 1 at 24x24
    # Batch 16 with a cosine decay: at equal compute, twice the steps of batch 32 learn shape
    # and size much better (docs/notes.md). Held-out colour-shape pairs are learned after
    # the seen ones, so every step the ten-minute budget allows counts.
    c.optim.schedule = "cosine"
    c.train.update(batch_size=16, num_steps=8000, log_every=100, checkpoint_every=2000,
                   sample_every=4000, keep_checkpoints=2)
    c.sample.update(num_steps=20, cfg_scale=3.0, batch_size=8)
    c.eval.update(num_samples=48, num_steps=20, cfg_scale=3.0)
    if variant == "cpu_long":
      # Held-out colour-shape pairs are learned late (compositional generalisation emerges
      # after the seen pairs): five times the steps, scored every 2000 for the curve.
      c.train.update(num_steps=24000, checkpoint_every=4000, sample_every=8000)
      c.eval.every = 2000
  else:  # test
    c.model.update(variant="d2", patch_size=4, pos_embed_max_size=8)
    c.text.update(width=32, depth=1, num_heads=2, max_len=32)
    c.data.resolution = 16
    c.diffusion.shift.base_seq_len = 16
    c.train.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=2, sample_every=4,
                   keep_checkpoints=2)
    c.sample.update(num_steps=2, batch_size=4, prompts=("a large red circle in the top left",
                                                        "a small blue square in the center"))
    c.eval.update(num_samples=4, num_steps=2, at_end=False)
  return c
