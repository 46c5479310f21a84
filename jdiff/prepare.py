"""Convert any data source into sharded ArrayRecord files (jdiff/data/shards.py).

  python -m jdiff.prepare --config=configs/mmdit_256.py --config.data.source=folder \\
      --config.data.path=/data/my_images --out=/data/my_images_ar [--records_per_shard=4096] [--workers=8]

Then train with --config.data.source=arrayrecord --config.data.path=OUT. Prints the totals as
one JSON line.
"""

import json
import os

from absl import flags
from ml_collections import config_flags

from jdiff import cli
from jdiff.data import shards

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose config.data to convert.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_PER_SHARD = flags.DEFINE_integer("records_per_shard", 4096, "Source records per ArrayRecord file.", lower_bound=1)
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "Worker processes.", lower_bound=1)
_NUM = flags.DEFINE_integer("num_records", None, "Convert the first N records (default: all).", lower_bound=1)
_SPLIT = flags.DEFINE_string("split", "train", "Source split.")
_PROCESS_INDEX = flags.DEFINE_integer("process_index", 0, "This process's number among --process_count.",
                                      lower_bound=0)
_PROCESS_COUNT = flags.DEFINE_integer("process_count", 1, "Processes sharing the work.", lower_bound=1)
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  cli.no_arguments(argv)
  cli.set_log_levels()
  result = shards.prepare(_CONFIG.value.data, _OUT.value, records_per_shard=_PER_SHARD.value,
                               workers=_WORKERS.value, num_records=_NUM.value, split=_SPLIT.value,
                               process_index=_PROCESS_INDEX.value, process_count=_PROCESS_COUNT.value)
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
