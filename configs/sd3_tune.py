"""Fine-tune an imported SD3 / SD3.5 model (latent space, frozen CLIP-L/G + T5, cached).

  python -m jdiff.convert import --src=/models/sd3.5-medium --workdir=runs/sd35_base
  python -m jdiff.cache --config=configs/sd3_tune.py --config.init_from=runs/sd35_base \\
      --out=runs/sd35_cache --num_records=20000
  python -m jdiff.main --config=configs/sd3_tune.py --config.init_from=runs/sd35_base \\
      --config.data.cache_dir=runs/sd35_cache --workdir=runs/sd35_tuned
  python -m jdiff.convert export --workdir=runs/sd35_tuned --out=/models/sd35_tuned

The architecture, text encoders and VAE come from init_from (model.name='inherit').
Variant 'test' is the seconds-long run of tests/test_finetune.py on a tiny pipeline.
"""

from jdiff import config as config_lib

VARIANTS = ("gpu", "test")


def get_config(arg: str | None = None):
  variant = arg or "gpu"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/sd3_tune.py; expected one of {VARIANTS}")
  c = config_lib.base()
  c.stage = "tune"
  c.model.name = "inherit"
  c.data.update(source="cache", resolution=1024, caption_dropout=0.1)
  # SD3's recipe: logit-normal t, static shift 3 at 1024px (diffusion.shift is inherited from
  # the imported scheduler).
  c.optim.update(lr=1e-5, warmup_steps=100, weight_decay=1e-2, ema_decay=0.999)
  c.train.update(batch_size=16, num_steps=2000, log_every=20, checkpoint_every=500, sample_every=500)
  c.sample.update(num_steps=28, cfg_scale=5.0, batch_size=4)
  if variant == "test":
    c.data.update(resolution=16, read_threads=1, prefetch=8)
    c.optim.update(lr=1e-3, warmup_steps=0, ema_decay=0.5)
    c.train.update(batch_size=4, num_steps=3, log_every=1, checkpoint_every=3, sample_every=3)
    c.sample.update(num_steps=2, batch_size=2, prompts=("a large red circle in the top left",
                                                        "a small blue square in the center"))
  return c
