"""LoRA fine-tune of an imported Flux pipeline (dev or schnell; latent space, frozen CLIP-L + T5,
cached), the way people tune Flux on a folder of captioned images:

  python -m jdiff.convert import --src=/models/FLUX.1-dev --workdir=runs/flux_base
  python -m jdiff.cache --config=configs/flux_tune.py --config.init_from=runs/flux_base \\
      --config.data.source=folder --config.data.path=/data/my_images --out=runs/flux_cache
  python -m jdiff.main --config=configs/flux_tune.py --config.init_from=runs/flux_base \\
      --config.data.cache_dir=runs/flux_cache --workdir=runs/flux_lora
  python -m jdiff.convert export_lora --workdir=runs/flux_lora --out=/models/flux_lora [--naming=kohya]

The architecture, text encoders, VAE and the timestep shift (Flux's mu linear in the token
count) come from init_from (model.name='inherit'). A guidance-embedded model (dev) trains
with the guidance input diffusion.guidance = 1 and samples with its usual guidance
(sample.cfg_scale 3.5, one forward a step); schnell samples with 4 steps and no guidance.
Training for real classifier-free guidance instead (the distilled guidance is given up):
--config.data.caption_dropout=0.1 --config.sample.cfg_scale=1 --config.sample.true_cfg_scale=4
(guidance input 1 in training and sampling, two forwards a sampling step).
Full fine-tuning: --config.lora.rank=0 --config.optim.trainable=''.
Variant 'test' is the seconds-long run of tests/test_flux_pipeline.py on a tiny pipeline.
"""

from jdiff import config as config_lib

VARIANTS = ("gpu", "test")


def get_config(arg: str | None = None):
  variant = arg or "gpu"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/flux_tune.py; expected one of {VARIANTS}")
  c = config_lib.base()
  c.stage = "tune"
  c.model.name = "inherit"
  c.data.update(source="cache", resolution=1024, caption_dropout=0.05)
  # Adapters on every block's attention and MLP projections (the single blocks' fused
  # q, k, v and MLP input included); only they train and the base stays frozen.
  c.lora.update(rank=16, alpha=16.0)
  # The 12B base frozen in bfloat16 (24 GB) with float32 adapters and Adam state
  # (lora.param_dtype); --config.lora.quantize_base=int8 holds the adapted kernels in 8 bits
  # (BENCHMARKS.md "LoRA memory" has the step's memory for each).
  c.model.param_dtype = "bfloat16"
  c.optim.update(trainable=".*lora_.*", lr=1e-4, warmup_steps=100, weight_decay=0.0, ema_decay=0.999)
  c.diffusion.guidance = 1.0
  c.train.update(batch_size=4, num_steps=2000, log_every=20, checkpoint_every=500, sample_every=500)
  c.sample.update(num_steps=28, cfg_scale=3.5, batch_size=2)
  if variant == "test":
    c.model.param_dtype = "float32"  # compared with diffusers' float32 pipeline
    c.data.update(resolution=16, read_threads=1, prefetch=8)
    c.lora.update(rank=2, alpha=2.0)
    c.optim.update(lr=1e-2, warmup_steps=0, ema_decay=0.5)
    c.train.update(batch_size=4, num_steps=3, log_every=1, checkpoint_every=3, sample_every=3)
    c.sample.update(num_steps=2, batch_size=2, prompts=("a large red circle in the top left",
                                                        "a small blue square in the center"))
  return c
