"""Generate images from a trained workdir's latest checkpoint (EMA weights).

  python -m jdiff.sample --workdir=DIR --prompt="a large red circle in the top left" \
      [--prompt=... --num_images=4 --num_steps=28 --cfg_scale=5 --seed=0 --out=DIR/generated]

Writes OUT/<index>.png per image, OUT/grid.png and OUT/prompts.txt (index: prompt), enlarged
to a viewable size (--upscale; jdiff.inference.write_samples); prints the paths as JSON.
"""

import json
import os

from absl import flags

from jdiff import cli
from jdiff import inference

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_PROMPTS = flags.DEFINE_multi_string("prompt", None, "Caption; repeat the flag for several.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1, "Images per prompt (different noise).", lower_bound=1)
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Sampler steps (default: config.sample).", lower_bound=1)
_CFG_SCALE = flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: config.sample); a guidance-embedded "
                                 "model's guidance input.", lower_bound=0)
_TRUE_CFG = flags.DEFINE_float("true_cfg_scale", None, "Guidance-embedded models: classifier-free guidance on top "
                               "(default: config.sample; 1 = none).", lower_bound=0)
_METHOD = flags.DEFINE_enum("method", None, ["euler", "heun"], "ODE solver (default: config.sample).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed; image i uses fold_in(seed, i).")
_RESOLUTION = flags.DEFINE_integer("resolution", None, "Output size (default: training resolution).", lower_bound=1)
_HEIGHT = flags.DEFINE_integer("height", None, "Output height (default: --resolution); with --width, any shape "
                               "in multiples of the patch size that the model's position table covers.", lower_bound=1)
_WIDTH = flags.DEFINE_integer("width", None, "Output width (default: --resolution).", lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/generated); the images of an earlier "
                           "jdiff.sample there (NNNN.png, grid.png) are replaced, other files are left alone.")
_UPSCALE = flags.DEFINE_integer("upscale", 0, "Enlarge the written images this many times (nearest neighbour); 0: "
                                "enough for a short side of at least 256 pixels; 1: as generated.", lower_bound=0)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", lower_bound=0)
flags.mark_flags_as_required(["workdir", "prompt"])

def main(argv):
  cli.no_arguments(argv)
  cli.set_log_levels()
  model = inference.load(_WORKDIR.value, _STEP.value)
  side = _RESOLUTION.value or model.networks.resolution
  print(json.dumps(inference.write_samples(
      model, _PROMPTS.value, _OUT.value or os.path.join(_WORKDIR.value, "generated"), num_images=_NUM_IMAGES.value,
      upscale=_UPSCALE.value, num_steps=_NUM_STEPS.value, cfg_scale=_CFG_SCALE.value, method=_METHOD.value,
      seed=_SEED.value, resolution=(_HEIGHT.value or side, _WIDTH.value or side), true_cfg_scale=_TRUE_CFG.value)))


if __name__ == "__main__":
  cli.run(main)
