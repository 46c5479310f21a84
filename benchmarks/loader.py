"""Input-pipeline throughput against what the train step consumes.

  python benchmarks/loader.py [--seconds=20]

For the CPU demo config (24 px) and the GPU default (256 px, shapes), builds the real grain
pipeline (make_pipeline: shuffle, per-process rows, render/decode, resize, tokenise, batch)
and counts images per second after a warm-up batch, with the config's read threads, other
thread counts (--threads) and worker processes (--workers). Step demand comes from
`--demand_cpu` (measured with `python -m jdiff.bench --config=configs/mmdit_256.py:cpu`)
and `--demand_gpu` (images/s of the H100 run in BENCHMARKS.md); the loader must supply at
least 5x.
"""

import argparse
import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(variant):
  from jdiff import config as config_lib

  return config_lib.load(os.path.join(ROOT, "configs", f"mmdit_256.py:{variant}"))


def rate(c, seconds, **data_overrides):
  from jdiff.data import pipeline

  data = dict(c.data, **data_overrides)
  p = pipeline.make_pipeline(data, global_batch=c.train.batch_size, max_len=c.text.max_len, seed=0,
                             process_index=0, process_count=1)
  next(p)  # warm-up (workers start, first records render)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    n += len(next(p)["image"])
  return n / (time.perf_counter() - t0)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seconds", type=float, default=20)
  ap.add_argument("--demand_cpu", type=float, default=408.5, help="images/s the CPU demo step consumes")
  ap.add_argument("--demand_gpu", type=float, default=389.4, help="images/s of the GPU default step (H100)")
  ap.add_argument("--threads", default="config,8",
                  help="comma-separated read-thread counts to try ('config': the config's own setting)")
  ap.add_argument("--workers", default="2", help="comma-separated worker-process counts to try besides threads")
  args = ap.parse_args()
  from jdiff.data import pipeline

  for variant, demand in (("cpu", args.demand_cpu), ("gpu", args.demand_gpu)):
    c = config(variant)
    modes = [dict(read_threads=c.data.read_threads if t == "config" else int(t)) for t in args.threads.split(",") if t]
    modes += [dict(num_workers=int(w)) for w in args.workers.split(",") if w]
    for overrides in modes:
      r = rate(c, args.seconds, **overrides)
      data = dict(c.data, **overrides)
      print(json.dumps(dict(config=variant, resolution=c.data.resolution, batch=c.train.batch_size,
                            read_threads=pipeline.read_threads(data), num_workers=data["num_workers"],
                            images_per_s=round(r, 1), step_demand=demand, headroom=round(r / demand, 2))),
            flush=True)


if __name__ == "__main__":
  main()
