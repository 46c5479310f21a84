"""Weights between diffusers directories and jdiff workdirs.

  # A diffusers SD3 / SD3.5 pipeline (or its transformer/ directory) -> a jdiff workdir that
  # later stages start from (config.init_from), holding the EMA=params weights at step 0:
  python -m jdiff.convert import --src=/models/sd3.5-medium --workdir=runs/sd35_base

  # A jdiff workdir's EMA weights -> a diffusers directory. With a pipeline to copy the other
  # components from (default: the run's config.text.pipeline), the result is a whole
  # pipeline that StableDiffusion3Pipeline.from_pretrained loads; else transformer/ only.
  python -m jdiff.convert export --workdir=runs/sd35_tuned --out=/models/sd35_tuned [--pipeline=SRC]

  # A LoRA run's adapters alone, in diffusers/PEFT naming (out/pytorch_lora_weights.safetensors;
  # load with pipe.load_lora_weights(out)):
  python -m jdiff.convert export_lora --workdir=runs/sd35_lora --out=/models/sd35_lora

Flux transformers (FluxTransformer2DModel) convert both ways as weights (transformer/ only).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jdiff import checkpoint
from jdiff import cli
from jdiff import config as config_lib
from jdiff import errors
from jdiff import inference
from jdiff.interop import flux, mapping, sd3, sd3_pipeline
from jdiff.models import layers

log = logging.getLogger("jdiff.convert")  # not __name__: "__main__" under python -m

_SRC = flags.DEFINE_string("src", None, "import: a diffusers pipeline or transformer directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The jdiff workdir (written by import, read by export).")
_OUT = flags.DEFINE_string("out", None, "export: the diffusers directory to write.")
_PIPELINE = flags.DEFINE_string("pipeline", None, "export: pipeline to copy the other components from "
                                "(default: config.text.pipeline; '' for transformer/ only).")
_STEP = flags.DEFINE_integer("step", None, "export: checkpoint step (default: latest).", lower_bound=0)
_SCAN = flags.DEFINE_boolean("scan", False, "import: store blocks for model.scan=True (else unrolled, the "
                             "default config's layout; a run with the other setting converts at init_from).")

FAMILIES = {"SD3Transformer2DModel": "mmdit", "FluxTransformer2DModel": "flux"}
# jdiff model fields that describe an imported architecture (written into its config).
MODEL_FIELDS = ("depth", "width", "num_heads", "patch_size", "in_channels", "out_channels", "pos_embed_max_size",
                "pos_embed_base_size", "qk_norm", "dual_attention_depth", "context_dim", "pooled_dim")


def _io(family: str):
  return {"mmdit": sd3, "flux": flux}[family]


def import_dir(src: str, workdir: str, scan: bool = False):
  """Converts `src` and writes `workdir` (config.json + a step-0 weights checkpoint). Returns the config."""

  tdir = sd3_pipeline.component_dir(src, "transformer")
  tconfig = mapping.read_config(tdir)
  family = FAMILIES.get(tconfig.get("_class_name"))
  if family is None:
    raise errors.InvalidArgument(f"{tdir}: unsupported transformer class {tconfig.get('_class_name')!r}; "
                                 f"expected one of {tuple(FAMILIES)}")
  io = _io(family)
  kwargs = io.model_kwargs(tconfig)
  params = jax.tree.map(jnp.asarray, io.to_jdiff(tconfig, mapping.load_safetensors(tdir)))
  params = io.scan_layout(params, kwargs, scan)

  c = config_lib.base()
  c.stage = "pretrain"
  c.model.update(name=family, scan=scan, **{k: v for k, v in kwargs.items() if k in MODEL_FIELDS})
  c.model.variant = "schnell" if family == "flux" else f"d{kwargs['depth']}"
  if family == "flux":
    with c.unlocked():
      c.model.update(single_depth=kwargs["single_depth"], guidance_embed=kwargs["guidance_embed"],
                     axes_dims=list(kwargs["axes_dims"]), pos_embed_max_size=0)
  pipeline = os.path.exists(os.path.join(src, "model_index.json"))
  if family == "mmdit" and pipeline:
    c.text.update(encoder="sd3", pipeline=os.path.abspath(src))
    c.autoencoder.path = os.path.abspath(src)
    geometry = sd3_pipeline.vae_geometry(src)
    c.data.resolution = tconfig["sample_size"] * geometry["factor"]
    scheduler = os.path.join(src, "scheduler", "scheduler_config.json")
    if os.path.exists(scheduler):
      with open(scheduler) as f:
        shift = json.load(f).get("shift", 1.0)
      c.diffusion.shift.update(kind="fixed", shift=float(shift))
  lineage = [dict(stage="import", workdir=os.path.abspath(workdir), init_from=os.path.abspath(src), from_step=None)]
  checkpoint.save_weights(workdir, {"denoiser": params}, c, lineage)
  log.info("imported %s (%s) into %s", tdir, tconfig["_class_name"], workdir)
  return c


def _denoiser_kwargs(model) -> tuple[Any, dict[str, Any]]:
  """(interop module, the jdiff model arguments its rules take) of a loaded jdiff model."""
  family = model.config.model.name
  if family not in ("mmdit", "flux"):
    raise errors.InvalidArgument(f"model {family!r} has no diffusers counterpart (mmdit -> SD3, flux -> Flux)")
  denoiser = model.networks.denoiser
  fields = MODEL_FIELDS + (("single_depth", "guidance_embed", "axes_dims", "time_scale") if family == "flux"
                           else ("time_scale",))
  return _io(family), {f: getattr(denoiser, f) for f in fields if hasattr(denoiser, f)}


def export_dir(workdir: str, out: str, pipeline: str | None = None, step: int | None = None) -> dict[str, Any]:
  """Writes `workdir`'s EMA denoiser as a diffusers transformer (and, given a pipeline, the
  rest of the pipeline beside it). Returns {'transformer': dir, 'pipeline': dir or None, 'step'}."""

  model = inference.load(workdir, step)
  family = model.config.model.name
  io, kwargs = _denoiser_kwargs(model)
  dconfig = io.diffusers_config(kwargs)
  params = jax.device_get(model.params["denoiser"])
  if model.networks.lora is not None:  # fold the adapters into the weights
    params = layers.merge_lora(params, model.networks.lora)
  params = jax.tree.map(np.asarray, params)
  tensors = io.to_diffusers(dconfig, io.unrolled_layout(params))
  if pipeline is None:
    pipeline = model.config.text.pipeline if family == "mmdit" else ""
  if pipeline:
    if not os.path.exists(os.path.join(pipeline, "model_index.json")):
      raise errors.NotFound(f"{pipeline!r} is not a diffusers pipeline directory (no model_index.json)")
    os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(pipeline)):
      src = os.path.join(pipeline, name)
      if name == "transformer":
        continue
      dst = os.path.join(out, name)
      if os.path.isdir(src):
        shutil.copytree(src, dst, dirs_exist_ok=True)
      else:
        shutil.copy2(src, dst)
  tdir = os.path.join(out, "transformer") if pipeline else out
  mapping.save_safetensors(tensors, tdir, dconfig)
  log.info("exported %s (step %s) to %s", workdir, model.step, tdir)
  return dict(transformer=tdir, pipeline=out if pipeline else None, step=model.step)


LORA_FILE = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for


def export_lora_dir(workdir: str, out: str, step: int | None = None) -> dict[str, Any]:
  """Writes the EMA LoRA adapters of `workdir` to out/pytorch_lora_weights.safetensors in
  diffusers/PEFT naming (mapping.export_lora). Returns {'file', 'step', 'num_tensors', 'rank'}."""

  model = inference.load(workdir, step)
  lora = model.networks.lora
  if lora is None:
    raise errors.InvalidArgument(f"{workdir} was not trained with LoRA adapters (config.lora.rank = 0)")
  io, kwargs = _denoiser_kwargs(model)
  params = jax.tree.map(np.asarray, jax.device_get(model.params["denoiser"]))
  tensors = mapping.export_lora(io.rules(kwargs), io.unrolled_layout(params), lora.scale)
  if any(np.asarray(v).dtype != np.float32 for v in tensors.values()):
    tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, LORA_FILE)
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
  log.info("exported %d LoRA tensors of %s (step %s) to %s", len(tensors), workdir, model.step, path)
  return dict(file=path, step=model.step, num_tensors=len(tensors), rank=lora.rank)


def main(argv):
  if len(argv) != 2 or argv[1] not in ("import", "export", "export_lora"):
    raise app.UsageError("usage: python -m jdiff.convert import --src=DIR --workdir=W | "
                         "export --workdir=W --out=DIR [--pipeline=SRC] | export_lora --workdir=W --out=DIR")
  cli.set_log_levels()
  if argv[1] == "import":
    if not _SRC.value or not _WORKDIR.value:
      raise app.UsageError("import needs --src and --workdir")
    config = import_dir(_SRC.value, _WORKDIR.value, _SCAN.value)
    print(json.dumps({"workdir": _WORKDIR.value, "model": config.model.name, "depth": config.model.depth,
                      "width": config.model.width}))
  else:
    if not _WORKDIR.value or not _OUT.value:
      raise app.UsageError(f"{argv[1]} needs --workdir and --out")
    if argv[1] == "export_lora":
      print(json.dumps(export_lora_dir(_WORKDIR.value, _OUT.value, _STEP.value)))
    else:
      print(json.dumps(export_dir(_WORKDIR.value, _OUT.value, _PIPELINE.value, _STEP.value)))


if __name__ == "__main__":
  cli.run(main)
