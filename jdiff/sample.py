"""Generate images from a trained workdir's latest checkpoint (EMA weights).

  python -m jdiff.sample --workdir=DIR --prompt="a large red circle in the top left" \
      [--prompt=... --num_images=4 --num_steps=28 --cfg_scale=5 --seed=0 --out=DIR/generated]

Writes OUT/<index>.png per image, OUT/grid.png and OUT/prompts.txt (index: prompt), enlarged
to a viewable size (--upscale); prints the paths as JSON.
"""

import json
import math
import os
import re

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

MIN_VIEW_SIDE = 256  # --upscale=0 enlarges small images to at least this short side


def main(argv):
  del argv
  cli.set_log_levels()

  model = inference.load(_WORKDIR.value, _STEP.value)
  side = _RESOLUTION.value or model.networks.resolution
  size = (_HEIGHT.value or side, _WIDTH.value or side)
  prompts = [p for p in _PROMPTS.value for _ in range(_NUM_IMAGES.value)]
  images = inference.generate(model, prompts, num_steps=_NUM_STEPS.value, cfg_scale=_CFG_SCALE.value,
                              method=_METHOD.value, seed=_SEED.value, resolution=size,
                              true_cfg_scale=_TRUE_CFG.value)
  out = _OUT.value or os.path.join(_WORKDIR.value, "generated")
  os.makedirs(out, exist_ok=True)
  stale = [n for n in os.listdir(out) if re.fullmatch(r"\d{4}\.png|grid\.png|prompts\.txt", n)]
  for name in stale:  # an earlier run's images: none may stay beside a prompts.txt that does not list them
    os.remove(os.path.join(out, name))
  upscale = _UPSCALE.value or max(1, math.ceil(MIN_VIEW_SIDE / min(images.shape[1:3])))
  paths = []
  for i, image in enumerate(images):
    paths.append(os.path.join(out, f"{i:04d}.png"))
    inference.save_png(image, paths[-1], upscale)
  inference.save_png(inference.grid(images, columns=_NUM_IMAGES.value if _NUM_IMAGES.value > 1 else None),
                     os.path.join(out, "grid.png"), upscale)
  with open(os.path.join(out, "prompts.txt"), "w") as f:
    f.write("\n".join(f"{i:04d}: {p}" for i, p in enumerate(prompts)) + "\n")
  print(json.dumps({"step": model.step, "images": paths, "grid": os.path.join(out, "grid.png")}))


if __name__ == "__main__":
  cli.run(main)
