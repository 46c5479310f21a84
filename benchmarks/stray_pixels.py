"""Stray pixels in a model's shapes-benchmark images: what the adherence analyser does not
measure (specks, stripes, noise beside a correctly read shape).

  python benchmarks/stray_pixels.py --workdir=RUN [--workdir=RUN2 ...] [--num_samples=240]

For the benchmark's prompts of the seen and held-out splits (the prompts and noise of
`python -m jdiff.evaluate`, EMA weights, config.eval's sampler), prints per run one JSON line
with the mean over images of |image - its 3x3 median filter| (0-255 scale) and its standard
error. Flat colour scores about zero and edges add the same for every model drawing the same
shapes, so a rise between models of one benchmark means noisier images. BENCHMARKS.md ("DPO
at equal compute") used it to show reward hacking that the analyser's verdicts miss.
"""

from __future__ import annotations

import json

from absl import app, flags
import numpy as np
from scipy.ndimage import median_filter

from jdiff import inference
from jdiff.data import shapes
from jdiff.eval import benchmark

def stray_pixels(images: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, C] -> [N]: mean |x - median3x3(x)| per image (channels filtered apart)."""
  x = images.astype(np.float32)
  return np.abs(x - median_filter(x, size=(1, 3, 3, 1))).mean(axis=(1, 2, 3))

def main(argv):
  del argv
  for workdir in _WORKDIRS.value:
    model = inference.load(workdir)
    e = model.config.eval
    out = {"workdir": workdir}
    for name in ("seen", "held_out"):
      prompts = shapes.benchmark(benchmark.SPLITS[name], _NUM.value)
      images = inference.generate(model, [p for p, _ in prompts], num_steps=e.num_steps, cfg_scale=e.cfg_scale,
                                  method=e.method, seed=e.seed)
      s = stray_pixels(images)
      out[name] = dict(mean=round(float(s.mean()), 3), se=round(float(s.std() / np.sqrt(len(s))), 3), n=len(s))
    print(json.dumps(out), flush=True)

if __name__ == "__main__":  # flags only when run: tests import the module beside others that define them
  _WORKDIRS = flags.DEFINE_multi_string("workdir", None, "Run(s) to score.")
  _NUM = flags.DEFINE_integer("num_samples", 240, "Prompts per split.", lower_bound=1)
  flags.mark_flag_as_required("workdir")
  app.run(main)
