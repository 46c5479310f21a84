"""Redraw a run's learning curve (training and validation loss, loss per t bin, learning
rate, gradient norm, adherence, other metrics) from its metrics.jsonl and eval.jsonl.

  python -m jdiff.curves --workdir=DIR [--out=OUT.png]   # default DIR/learning_curve.png

The trainer draws the same figure after every evaluation and at the end of a run. Prints
the path written.
"""

from absl import flags

from jdiff import cli
from jdiff.eval import curves

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_OUT = flags.DEFINE_string("out", None, "PNG to write (default: WORKDIR/learning_curve.png).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  cli.no_arguments(argv)
  print(curves.write(_WORKDIR.value, _OUT.value)[0])


if __name__ == "__main__":
  cli.run(main)
