"""Evaluate a trained workdir; prints one JSON line.

  python -m jdiff.evaluate --workdir=DIR [--num_samples=64 --num_steps=28 --cfg_scale=5 --grids=DIR/verdicts]
  python -m jdiff.evaluate --workdir=DIR --metrics=fid,kid --fid_stats=stats.npz \
      --fid_weights=pt_inception-2015-12-05-6726825d.pth [--num_samples=10000 --height=H --width=W]

adherence (the default) is caption adherence on the shapes benchmark:
{"seen": {"color": a, "shape": a, "size": a, "position": a, "all": a, "n": N}, "held_out": {...}};
fid and kid compare generated images with statistics written by jdiff.fid_stats, clip_score
compares them with their prompts (--clip_model): one image per reference caption (or per
caption of the run's data), or --num_samples of them: {"fid": F, "kid": K, "kid_std": s,
"clip_score": C, "n": N, ...}.
"""

import json

from absl import flags

from jdiff import cli
from jdiff.eval import evaluator

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "Prompts per split (default: config.eval).", lower_bound=1)
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Sampler steps (default: config.eval).", lower_bound=1)
_CFG_SCALE = flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: config.eval).", lower_bound=0)
_METHOD = flags.DEFINE_enum("method", None, ["euler", "heun"], "ODE solver (default: config.eval).")
_SEED = flags.DEFINE_integer("seed", None, "Noise seed (default: config.eval).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", lower_bound=0)
_GRIDS = flags.DEFINE_string("grids", None, "adherence: also write each split's first --grid_images images to "
                             "DIR/<split>.png, framed green (all four attributes read right) or red, with "
                             "DIR/<split>.txt naming what was read wrong.")
_GRID_IMAGES = flags.DEFINE_integer("grid_images", 64, "Images per verdict grid (--grids).", lower_bound=1)
_METRICS = flags.DEFINE_list("metrics", ["adherence"], "Any of " + ", ".join(evaluator.COMMAND_METRICS) + ".")
_FID_STATS = flags.DEFINE_string("fid_stats", None, "Reference statistics .npz (python -m jdiff.fid_stats).")
_FID_WEIGHTS = flags.DEFINE_string("fid_weights", None, "FID Inception weights (pt_inception-2015-12-05-6726825d.pth).")
_CLIP_MODEL = flags.DEFINE_string("clip_model", None, "CLIP model directory for clip_score (a transformers "
                                  "CLIPModel saved with its tokenizer, e.g. a copy of openai/clip-vit-large-patch14).")
_HEIGHT = flags.DEFINE_integer("height", None, "Height of the images for fid, kid and clip_score (default: the "
                               "training resolution); any shape the model takes (see jdiff.sample).", lower_bound=1)
_WIDTH = flags.DEFINE_integer("width", None, "Width of those images (default: the training resolution).",
                              lower_bound=1)
flags.mark_flag_as_required("workdir")

def main(argv):
  cli.no_arguments(argv)
  cli.set_log_levels()
  print(json.dumps(evaluator.evaluate_workdir(
      _WORKDIR.value, _METRICS.value, step=_STEP.value, num_samples=_NUM_SAMPLES.value, num_steps=_NUM_STEPS.value,
      cfg_scale=_CFG_SCALE.value, method=_METHOD.value, seed=_SEED.value, grid_dir=_GRIDS.value,
      grid_images=_GRID_IMAGES.value, fid_stats=_FID_STATS.value, fid_weights=_FID_WEIGHTS.value,
      clip_model=_CLIP_MODEL.value, height=_HEIGHT.value, width=_WIDTH.value)))


if __name__ == "__main__":
  cli.run(main)
