"""On-policy preference pairs for a DPO stage: the model's own wrong samples as the rejected
images (jdiff/eval/on_policy.py says how they are chosen and what is written).

  python -m jdiff.pairs --workdir=SFT_DIR --out=PAIRS_DIR [--num=2048 --num_steps=20 --cfg_scale=3]
  python -m jdiff.pairs --workdir=DIR --out=PAIRS_DIR --preferred=sample --samples_per_caption=4 \\
      [--split=held_out]

Train on them with data.source='preference' and data.pairs_dir=PAIRS_DIR. Prints the
pairs' meta.json as one JSON line.
"""

import json

from absl import flags

from jdiff import cli
from jdiff.eval import on_policy

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the model whose samples are rejected.")
_OUT = flags.DEFINE_string("out", None, "Directory to write pairs.npz and meta.json to.")
_NUM = flags.DEFINE_integer("num", 2048, "Captions to sample (records 0..num-1 of the split).", lower_bound=1)
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Sampler steps (default: config.eval).", lower_bound=1)
_CFG_SCALE = flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: config.eval).", lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_PREFERRED = flags.DEFINE_enum("preferred", "render", on_policy.PREFERRED,
                               "Preferred image: the caption's render, or a right sample of the model's own.")
_SAMPLES = flags.DEFINE_integer("samples_per_caption", 1, "Samples per caption (preferred=sample: >= 2).",
                                lower_bound=1)
_SPLIT = flags.DEFINE_string("split", None, "Shapes split of the captions (default: the model's data.shapes_split; "
                             "held_out only with preferred=sample).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  cli.no_arguments(argv)
  cli.set_log_levels()
  print(json.dumps(on_policy.generate(
      _WORKDIR.value, _OUT.value, num=_NUM.value, num_steps=_NUM_STEPS.value, cfg_scale=_CFG_SCALE.value,
      seed=_SEED.value, preferred=_PREFERRED.value, samples_per_caption=_SAMPLES.value, split=_SPLIT.value)))


if __name__ == "__main__":
  cli.run(main)
