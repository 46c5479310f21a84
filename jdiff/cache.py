"""Precompute VAE latents and SD3 text embeddings of a dataset (see jdiff/data/cache.py).

  python -m jdiff.cache --config=configs/sd3_tune.py --config.init_from=runs/sd35_base \\
      --out=runs/cache_shapes_256 [--num_records=20000 --batch_size=16]

Then train with --config.data.source=cache --config.data.cache_dir=OUT.
"""

import json

from absl import app, flags
from ml_collections import config_flags

from jdiff import cli
from jdiff import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose data, autoencoder and text to use.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_NUM = flags.DEFINE_integer("num_records", None, "Records to encode (default: all of the source).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per encoder call.")
_SPLIT = flags.DEFINE_string("split", "train", "Source split.")
_DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "Storage dtype of latents and context.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.set_log_levels()
  from jdiff.data import cache  # pylint: disable=g-import-not-at-top

  config = config_lib.resolve(_CONFIG.value)
  if config.data.source == "cache":
    raise app.UsageError("config.data.source names the cache itself; set the source to read (e.g. shapes)")
  meta = cache.write(config, _OUT.value, split=_SPLIT.value, num_records=_NUM.value, batch_size=_BATCH.value,
                     dtype=_DTYPE.value)
  print(json.dumps({k: meta[k] for k in ("num_records", "skipped", "latent_shape", "context_shape", "pooled_dim")}))


if __name__ == "__main__":
  app.run(main)
