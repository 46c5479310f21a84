"""Weights between diffusers directories and jdiff workdirs (the library behind
`python -m jdiff.convert`, whose docstring shows each command): import_dir and export_dir
(whole models), export_lora_dir and import_lora_dir (LoRA adapters).

Flux transformers (FluxTransformer2DModel) convert both ways as weights (transformer/ only).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jdiff.workdir import checkpoint
from jdiff import config as config_lib
from jdiff import errors
from jdiff import inference
from jdiff.interop import flux, lora_files, mapping, sd3, sd3_pipeline
from jdiff.models import layers

log = logging.getLogger(__name__)


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
  if pipeline:
    c.autoencoder.path = os.path.abspath(src)
    geometry = sd3_pipeline.vae_geometry(src)
    if family == "mmdit":
      c.text.update(encoder="sd3", pipeline=os.path.abspath(src))
      c.data.resolution = tconfig["sample_size"] * geometry["factor"]
    else:  # Flux: its native 1024 pixels; T5 tokens as diffusers' FluxPipeline (dev 512, schnell 256)
      c.text.update(encoder="flux", pipeline=os.path.abspath(src), t5_len=512 if kwargs["guidance_embed"] else 256)
      c.data.resolution = 1024
    scheduler = os.path.join(src, "scheduler", "scheduler_config.json")
    if os.path.exists(scheduler):
      with open(scheduler) as f:
        sched = json.load(f)
      if sched.get("use_dynamic_shifting"):  # Flux: mu linear in the token count, s = exp(mu)
        c.diffusion.shift.update(kind="flux", base_seq_len=int(sched.get("base_image_seq_len", 256)),
                                 max_seq_len=int(sched.get("max_image_seq_len", 4096)),
                                 base_shift=float(sched.get("base_shift", 0.5)),
                                 max_shift=float(sched.get("max_shift", 1.15)))
      else:
        c.diffusion.shift.update(kind="fixed", shift=float(sched.get("shift", 1.0)))
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
  io, kwargs = _denoiser_kwargs(model)
  dconfig = io.diffusers_config(kwargs)
  params = jax.device_get(model.params["denoiser"])
  if model.networks.lora is not None:  # fold the adapters into the weights
    params = layers.merge_lora(params, model.networks.lora)
  params = jax.tree.map(np.asarray, params)
  tensors = io.to_diffusers(dconfig, io.unrolled_layout(params))
  if pipeline is None:
    pipeline = model.config.text.pipeline
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


# File names: the one diffusers' load_lora_weights looks for in a directory, and the kohya one.
LORA_FILES = {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "lora_kohya.safetensors"}
LORA_FILE = LORA_FILES["diffusers"]
_LAYERS = {"mmdit": lora_files.sd3_layers, "flux": lora_files.flux_layers}


def export_lora_dir(workdir: str, out: str, step: int | None = None, naming: str = "diffusers") -> dict[str, Any]:
  """Writes the EMA LoRA adapters of `workdir` to out/ in `naming` (lora_files.NAMINGS):
  diffusers/PEFT (pytorch_lora_weights.safetensors) or kohya/ComfyUI (lora_kohya.safetensors,
  on the original checkpoint's fused layers). Returns {'file', 'step', 'num_tensors', 'rank', 'naming'}."""
  if naming not in lora_files.NAMINGS:
    raise errors.InvalidArgument(f"naming={naming!r}: expected one of {lora_files.NAMINGS}")
  model = inference.load(workdir, step)
  lora = model.networks.lora
  if lora is None:
    raise errors.InvalidArgument(f"{workdir} was not trained with LoRA adapters (config.lora.rank = 0)")
  io, kwargs = _denoiser_kwargs(model)
  params = io.unrolled_layout(jax.tree.map(np.asarray, jax.device_get(model.params["denoiser"])))
  rules = io.rules(kwargs)
  adapters = lora_files.adapters_from_params(rules, params, lora.scale)
  if naming == "kohya":
    tensors = lora_files.to_kohya(adapters, _LAYERS[model.config.model.name](kwargs),
                                  lora_files.output_widths(rules, params))
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(lora.rank),
                "ss_network_alpha": str(lora.alpha)}
  else:
    tensors = lora_files.to_peft(adapters)
    metadata = {}
  tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, LORA_FILES[naming])
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt", **metadata})
  log.info("exported %d LoRA tensors of %s (step %s) in %s naming to %s", len(tensors), workdir, model.step, naming,
           path)
  return dict(file=path, step=model.step, num_tensors=len(tensors), rank=lora.rank, naming=naming)


_BLOCK = re.compile(r"^((?:.*_)?blocks?)_(\d+)$")  # an unrolled block: 'blocks_3', 'single_blocks_0'


def _targets(paths: list[tuple[str, ...]], params: dict, scan: bool) -> str:
  """A lora.targets regex matching exactly the Dense layers at `paths` (unrolled layout of
  `params`); with scan, each block stack holds one set of adapters, so a layer must be
  adapted in all of its stack's blocks or in none."""
  names = ["/".join(p) for p in paths]
  if scan:
    depth = collections.Counter(m.group(1) for m in map(_BLOCK.match, params) if m)
    stacked = collections.Counter()
    for p in paths:
      m = _BLOCK.match(p[0])
      stacked[(m.group(1) if m else p[0],) + p[1:]] += 1
    uneven = sorted("/".join(k) for k, count in stacked.items() if k[0] in depth and count != depth[k[0]])
    if uneven:
      raise errors.InvalidArgument(f"the LoRA file adapts {uneven[0]} in some blocks of its stack only; a model with "
                                   "model.scan=True holds one set of adapters per stack: import into an unrolled model")
    names = ["/".join(k) for k in stacked]
  return "(" + "|".join(re.escape(n) for n in sorted(set(names))) + ")"


def import_lora_dir(src: str, base: str, workdir: str, merge: bool = False, step: int | None = None) -> dict[str, Any]:
  """A LoRA file (diffusers/PEFT or kohya naming, read from its keys) on `base`'s model ->
  `workdir`: the base weights with the adapters (config.lora set to the file's rank, scale and
  layers: sample it, export it, or train the adapters further with config.init_from), or with
  `merge` folded into the weights (config.lora.rank = 0). Returns {'workdir', 'naming',
  'rank', 'alpha', 'num_adapters', 'merged'}."""
  if not os.path.isfile(src):
    raise errors.NotFound(f"no LoRA file at {src!r}")
  model = inference.load(base, step)
  if model.networks.lora is not None:
    raise errors.InvalidArgument(f"{base} already has LoRA adapters (config.lora.rank = {model.config.lora.rank}): "
                                 "export it merged first (python -m jdiff.convert export) and import that")
  io, kwargs = _denoiser_kwargs(model)
  tensors = safetensors.numpy.load_file(src)
  naming = lora_files.naming_of(tensors)
  params = io.unrolled_layout(jax.tree.map(np.asarray, jax.device_get(model.params["denoiser"])))
  rules = io.rules(kwargs)
  if naming == "kohya":
    adapters = lora_files.from_kohya(tensors, _LAYERS[model.config.model.name](kwargs),
                                     lora_files.output_widths(rules, params))
  else:
    adapters = lora_files.from_peft(tensors)
  if not adapters:
    raise errors.InvalidArgument(f"{src} holds no non-zero adapters")
  ranks = {a.shape[1] for a, _, _ in adapters.values()}
  scales = sorted({s for _, _, s in adapters.values()})
  scale = max(scales, key=lambda s: sum(v[2] == s for v in adapters.values()))  # the commonest: exact for most
  lora = lora_files.adapters_to_params(rules, adapters, scale)
  rank = ranks.pop()
  spec = layers.LoRA(rank=rank, alpha=scale * rank)
  paths = [p[:-1] for p, _ in mapping._flatten(lora) if p[-1] == "lora_a"]
  config = model.config
  merged = _deep_merge(params, lora)
  if merge:
    merged = jax.tree.map(np.asarray, layers.merge_lora(merged, spec))
  else:
    config.lora.update(rank=rank, alpha=float(spec.alpha), targets=_targets(paths, params, config.model.scan))
  merged = io.scan_layout(jax.tree.map(jnp.asarray, merged), kwargs, config.model.scan)
  lineage = [dict(stage="import_lora", workdir=os.path.abspath(workdir), init_from=os.path.abspath(base),
                  from_step=model.step, lora_file=os.path.abspath(src))]
  checkpoint.save_weights(workdir, {"denoiser": merged}, config, lineage)
  log.info("%s %d adapters (%s naming, rank %d) of %s into %s", "merged" if merge else "imported", len(adapters),
           naming, rank, src, workdir)
  return dict(workdir=workdir, naming=naming, rank=rank, alpha=float(spec.alpha), num_adapters=len(adapters),
              merged=merge)


def _deep_merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and k in out else v
  return out
