"""Precompute VAE latents and text embeddings of a dataset with a pipeline's frozen encoders
(config.text.encoder: SD3's or Flux's recipe; the format: jdiff/data/latents.py).

  python -m jdiff.cache --config=configs/sd3_tune.py --config.init_from=runs/sd35_base \\
      --out=runs/cache_shapes_256 [--num_records=20000 --batch_size=16]

Then train with --config.data.source=cache --config.data.cache_dir=OUT. Prints the cache's
size and shapes as one JSON line.
"""

import json

from absl import flags
from ml_collections import config_flags

from jdiff import cli
from jdiff.workdir import run_config
from jdiff.hf import latent_cache

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose data, autoencoder and text to use.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_NUM = flags.DEFINE_integer("num_records", None, "Records to encode (default: all of the source).", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per encoder call.", lower_bound=1)
_SPLIT = flags.DEFINE_string("split", "train", "Source split.")
_DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "Storage dtype of latents and context.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  cli.no_arguments(argv)
  cli.set_log_levels()
  meta = latent_cache.write(run_config.prepare(_CONFIG.value, encoding=True), _OUT.value, split=_SPLIT.value,
                            num_records=_NUM.value, batch_size=_BATCH.value, dtype=_DTYPE.value)
  print(json.dumps({k: meta[k] for k in ("num_records", "skipped", "latent_shape", "context_shape", "pooled_dim")}))


if __name__ == "__main__":
  cli.run(main)
