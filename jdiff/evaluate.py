"""Evaluate a trained workdir; prints one JSON line.

  python -m jdiff.evaluate --workdir=DIR [--num_samples=64 --num_steps=28 --cfg_scale=5]
  python -m jdiff.evaluate --workdir=DIR --metrics=fid,kid --fid_stats=stats.npz \
      --fid_weights=pt_inception-2015-12-05-6726825d.pth [--num_samples=10000]

adherence (the default) is caption adherence on the shapes benchmark:
{"seen": {"color": a, "shape": a, "size": a, "position": a, "all": a, "n": N}, "held_out": {...}};
fid and kid compare generated images with statistics written by jdiff.fid_stats (one image
per reference caption, or --num_samples of them): {"fid": F, "kid": K, "kid_std": s, ...}.
"""

import json

from absl import flags

from jdiff import cli
from jdiff import inference
from jdiff import errors
from jdiff.eval import benchmark, fid

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "Prompts per split (default: config.eval).", lower_bound=1)
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Sampler steps (default: config.eval).", lower_bound=1)
_CFG_SCALE = flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: config.eval).", lower_bound=0)
_METHOD = flags.DEFINE_enum("method", None, ["euler", "heun"], "ODE solver (default: config.eval).")
_SEED = flags.DEFINE_integer("seed", None, "Noise seed (default: config.eval).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", lower_bound=0)
_METRICS = flags.DEFINE_list("metrics", ["adherence"], "Any of adherence, fid, kid.")
_FID_STATS = flags.DEFINE_string("fid_stats", None, "Reference statistics .npz (python -m jdiff.fid_stats).")
_FID_WEIGHTS = flags.DEFINE_string("fid_weights", None, "FID Inception weights (pt_inception-2015-12-05-6726825d.pth).")
flags.mark_flag_as_required("workdir")

METRICS = ("adherence", "fid", "kid")


def main(argv):
  del argv
  cli.set_log_levels()

  unknown = set(_METRICS.value) - set(METRICS)
  if unknown:
    raise errors.InvalidArgument(f"unknown --metrics {sorted(unknown)}; expected some of {list(METRICS)}")
  quality = [m for m in _METRICS.value if m in ("fid", "kid")]
  if quality and not (_FID_STATS.value and _FID_WEIGHTS.value):
    raise errors.InvalidArgument(f"--metrics={','.join(quality)} needs --fid_stats (python -m jdiff.fid_stats) and "
                                 "--fid_weights (the FID Inception weights file)")
  model = inference.load(_WORKDIR.value, _STEP.value)
  result = {}
  if "adherence" in _METRICS.value:
    result.update(benchmark.evaluate(model, num_samples=_NUM_SAMPLES.value, num_steps=_NUM_STEPS.value,
                                     cfg_scale=_CFG_SCALE.value, method=_METHOD.value, seed=_SEED.value))
  if quality:
    e = model.config.eval
    reference = fid.Reference.load(_FID_STATS.value)
    features = fid.Features.load(_FID_WEIGHTS.value, reference.resize)
    result.update(n=_NUM_SAMPLES.value or len(reference.captions or ()), resize=reference.resize)
    result.update(fid.evaluate(
        model, reference, features, quality, num_samples=_NUM_SAMPLES.value,
        seed=e.seed if _SEED.value is None else _SEED.value,
        num_steps=e.num_steps if _NUM_STEPS.value is None else _NUM_STEPS.value,
        cfg_scale=e.cfg_scale if _CFG_SCALE.value is None else _CFG_SCALE.value, method=_METHOD.value or e.method))
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
