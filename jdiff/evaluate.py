"""Caption adherence of a trained workdir on the shapes benchmark; prints one JSON line.

  python -m jdiff.evaluate --workdir=DIR [--num_samples=64 --num_steps=28 --cfg_scale=5]

{"seen": {"color": a, "shape": a, "size": a, "position": a, "all": a, "n": N}, "held_out": {...}}
"""

import json

from absl import flags

from jdiff import cli
from jdiff import inference
from jdiff.eval import benchmark

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "Prompts per split (default: config.eval).", lower_bound=1)
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Sampler steps (default: config.eval).", lower_bound=1)
_CFG_SCALE = flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: config.eval).", lower_bound=0)
_METHOD = flags.DEFINE_enum("method", None, ["euler", "heun"], "ODE solver (default: config.eval).")
_SEED = flags.DEFINE_integer("seed", None, "Noise seed (default: config.eval).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", lower_bound=0)
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  cli.set_log_levels()

  model = inference.load(_WORKDIR.value, _STEP.value)
  result = benchmark.evaluate(model, num_samples=_NUM_SAMPLES.value, num_steps=_NUM_STEPS.value,
                              cfg_scale=_CFG_SCALE.value, method=_METHOD.value, seed=_SEED.value)
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
