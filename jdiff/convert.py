"""Weights between diffusers directories and jdiff workdirs (jdiff/hf/workdirs.py).

  # A diffusers SD3 / SD3.5 pipeline (or its transformer/ directory) -> a jdiff workdir that
  # later stages start from (config.init_from), holding the EMA=params weights at step 0:
  python -m jdiff.convert import --src=/models/sd3.5-medium --workdir=runs/sd35_base

  # A jdiff workdir's EMA weights -> a diffusers directory. With a pipeline to copy the other
  # components from (default: the run's config.text.pipeline), the result is a whole
  # pipeline that StableDiffusion3Pipeline.from_pretrained loads; else transformer/ only.
  python -m jdiff.convert export --workdir=runs/sd35_tuned --out=/models/sd35_tuned [--pipeline=SRC]

  # A LoRA run's adapters alone, in diffusers/PEFT naming (out/pytorch_lora_weights.safetensors;
  # load with pipe.load_lora_weights(out)) or with --naming=kohya in sd-scripts' naming, which
  # ComfyUI and Forge read (out/lora_kohya.safetensors; diffusers reads it for Flux):
  python -m jdiff.convert export_lora --workdir=runs/sd35_lora --out=/models/sd35_lora [--naming=kohya]

  # A LoRA file from any trainer (diffusers/PEFT or kohya naming, told apart by its keys) on
  # an imported base: the base with the adapters (sample, export, or train them further with
  # config.init_from), or with --merge folded into the weights:
  python -m jdiff.convert import_lora --src=my_lora.safetensors --base=runs/sd35_base --workdir=runs/sd35_mine

Flux transformers (FluxTransformer2DModel) convert both ways as weights (transformer/ only).
Prints what was written as one JSON line.
"""

import json

from absl import app, flags

from jdiff import cli
from jdiff.hf import workdirs
from jdiff.interop import lora_files

_SRC = flags.DEFINE_string("src", None, "import: a diffusers pipeline or transformer directory; import_lora: a LoRA "
                           ".safetensors file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The jdiff workdir (written by import, read by export).")
_OUT = flags.DEFINE_string("out", None, "export: the diffusers directory to write.")
_PIPELINE = flags.DEFINE_string("pipeline", None, "export: pipeline to copy the other components from "
                                "(default: config.text.pipeline; '' for transformer/ only).")
_STEP = flags.DEFINE_integer("step", None, "export: checkpoint step (default: latest).", lower_bound=0)
_NAMING = flags.DEFINE_enum("naming", "diffusers", lora_files.NAMINGS, "export_lora: diffusers/PEFT naming, or "
                            "kohya's (sd-scripts, ComfyUI) on the original checkpoint's fused layers.")
_BASE = flags.DEFINE_string("base", None, "import_lora: the workdir of the model the LoRA file adapts.")
_MERGE = flags.DEFINE_boolean("merge", False, "import_lora: fold the adapters into the weights.")
_SCAN = flags.DEFINE_boolean("scan", False, "import: store blocks for model.scan=True (else unrolled, the "
                             "default config's layout; a run with the other setting converts at init_from).")

def _summary(config) -> dict:
  return {"workdir": _WORKDIR.value, "model": config.model.name, "depth": config.model.depth,
          "width": config.model.width}


# command -> (required flags, the call)
COMMANDS = {
    "import": (("src", "workdir"), lambda: _summary(workdirs.import_dir(_SRC.value, _WORKDIR.value, _SCAN.value))),
    "export": (("workdir", "out"), lambda: workdirs.export_dir(_WORKDIR.value, _OUT.value, _PIPELINE.value,
                                                               _STEP.value)),
    "export_lora": (("workdir", "out"), lambda: workdirs.export_lora_dir(_WORKDIR.value, _OUT.value, _STEP.value,
                                                                         _NAMING.value)),
    "import_lora": (("src", "base", "workdir"), lambda: workdirs.import_lora_dir(
        _SRC.value, _BASE.value, _WORKDIR.value, _MERGE.value, _STEP.value)),
}


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError("usage: python -m jdiff.convert import --src=DIR --workdir=W | "
                         "export --workdir=W --out=DIR [--pipeline=SRC] | export_lora --workdir=W --out=DIR "
                         "[--naming=kohya] | import_lora --src=FILE --base=W --workdir=W2 [--merge]")
  required, call = COMMANDS[argv[1]]
  missing = [name for name in required if not flags.FLAGS[name].value]
  if missing:
    raise app.UsageError(f"{argv[1]} needs " + " and ".join(f"--{m}" for m in required))
  cli.set_log_levels()
  print(json.dumps(call()))


if __name__ == "__main__":
  cli.run(main)
