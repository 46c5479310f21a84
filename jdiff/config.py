"""The shared shape of a jdiff config: its fields, their defaults and the allowed values of
every mode string.

Config files (configs/*.py) call `base()` and override what differs; jdiff.validation checks
the result before any compute, so a bad value fails at start with a message that names the
field. Unknown keys are rejected by ml_collections itself (configs are locked).

This module imports nothing of jdiff and nothing heavier than ml_collections, so loading
a config file is cheap. It lists the allowed value of every mode string; the modules that
implement them (models, data, diffusion, train) are checked against these lists by the
tests. What needs files on disk (a latent cache's meta.json, a VAE's geometry) is checked
where it is read, by jdiff.networks.build_networks.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Iterable

import ml_collections
from ml_collections import config_dict

from jdiff import errors

STAGES = ("pretrain", "posttrain", "tune", "distill")
# What each stage may optimise (config.objective); the objectives are in jdiff/train/objectives.py.
STAGE_OBJECTIVES = {"pretrain": ("flow",), "posttrain": ("flow", "dpo", "grpo"), "tune": ("flow", "grpo"),
                    "distill": ("guidance", "fewstep")}

# The allowed values of the mode strings, each beside the registry that implements it.
MODELS = ("dit", "mmdit", "flux")  # jdiff.models.MODELS ('inherit': see run_config.prepare)
ATTENTION = ("default", "xla", "cudnn")  # jdiff.models.layers.ATTENTION_IMPLS, and 'splash[:<block>]'
REMAT = ("none", "full", "dots", "dots_no_batch", "dots_no_batch_attention",
         "dots_no_batch_attention_mlp")  # jdiff.models.layers.REMAT_POLICIES
TEXT_ENCODERS = ("bytes", "sd3", "flux")  # jdiff.models.text.TEXT_ENCODERS, and a pipeline's frozen encoders (cached)
FROZEN_TEXT = ("sd3", "flux")  # jdiff.interop.sd3_pipeline.TEXT_RECIPES
DATA_SOURCES = ("shapes", "preference", "folder", "webdataset", "parquet", "tfds", "arrayrecord", "cache")  # jdiff.data.sources.SOURCES
CAPTION_FROM = ("auto", "filename")  # jdiff.data.files.CAPTION_FROM
MISSING_CAPTIONS = ("skip", "empty")  # jdiff.data.files.MISSING_CAPTION
LOSS_MASKS = ("none", "alpha", "file")  # jdiff.data.decode.LOSS_MASKS
WANDB_MODES = ("offline", "online")
SHAPES_SPLITS = ("train", "held_out", "new_color", "web", "curated", "prompts")  # jdiff.data.shapes.SPLITS
WEB_RATES = ("noise", "blur", "jpeg", "cast", "clutter", "occlusion", "crop", "wrong", "missing")  # degrade.RATES
EVAL_METRICS = ("adherence", "val_loss", "fid", "kid", "clip_score")  # jdiff.eval.evaluator.METRICS
PREDICTIONS = ("v", "eps", "x0")  # jdiff.diffusion.PREDICTIONS
WEIGHTINGS = ("none", "eps", "x0", "sigma_sqrt", "cosmap")  # jdiff.diffusion.WEIGHTINGS
TIMESTEP_KINDS = ("uniform", "logit_normal", "mode", "cosmap")  # jdiff.diffusion.TIMESTEP_KINDS
REWARDS = ("adherence", "adherence_all", "brightness")  # jdiff.eval.rewards.REWARDS
# Tokens (BOS + bytes) that hold every shapes caption up to its last attribute word.
SHAPES_CAPTION_TOKENS = 57
SHIFT_KINDS = ("sd3", "flux", "fixed", "none")  # jdiff.diffusion.SHIFT_KINDS
SAMPLERS = ("euler", "heun")  # jdiff.diffusion.METHODS
SCHEDULES = ("constant", "cosine")  # jdiff.train.optim.SCHEDULES

# Logical axis -> mesh axes. Parameters are stored sharded over fsdp and gathered for use
# (models/layers/partitioning.py); heads and MLP hidden units split over tensor; batch over data x fsdp.
LOGICAL_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("modulation", "tensor"),
    ("kv", None),
    ("cond", None),
    ("patch", None),
    ("vocab", None),
    ("length", None),
    ("norm", None),
    ("layers", None),
)


def base() -> ml_collections.ConfigDict:
  """Every field a run reads, with defaults for a GPU/TPU-sized MMDiT on the shapes data."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # init, shuffle and noise all derive from it
  c.stage = "pretrain"  # one of STAGES; recorded in the checkpoint lineage
  c.init_from = ""  # workdir of an earlier stage: start from its EMA params, fresh optimizer
  # flow: flow matching (pretrain, SFT, tuning); dpo: Diffusion-DPO on preference pairs
  # (posttrain); grpo: online RL with a reward (posttrain, tune); guidance / fewstep:
  # distillation (distill). dpo, grpo, guidance and fewstep keep a frozen copy of the
  # init_from model as the reference / teacher.
  c.objective = "flow"
  # Diffusion-DPO: beta scales the error margin (it absorbs the paper's beta*T); positive is
  # DPO-Positive's lambda (penalises a preferred error above the reference's); sft_weight adds
  # that multiple of the preferred sample's flow loss. See diffusion/preference.py.
  c.dpo = ml_collections.ConfigDict(dict(beta=1000.0, positive=0.0, sft_weight=0.0))
  # Online RL with a verifiable reward (objective 'grpo', Flow-GRPO; diffusion/grpo.py): each
  # step draws group_size images for each of train.batch_size prompts with the SDE that has the
  # flow ODE's marginals (num_steps Euler-Maruyama steps on the shifted sampling grid, noise
  # sigma_t = noise_level * sqrt(t / (1 - t)), classifier-free guidance cfg_scale), scores them
  # with `reward` (jdiff.eval.rewards), standardises the rewards within each group, and makes
  # updates_per_rollout AdamW updates on equal slices of the images with PPO's clipped ratio
  # (clip_range; log-probabilities are per dimension, hence the small range) plus kl_weight x the
  # KL to the frozen init_from model, over train_timesteps of each trajectory's steps (drawn per
  # image; None: all). Evaluation samples with the usual ODE sampler (config.eval).
  c.grpo = ml_collections.ConfigDict(dict(
      reward="adherence", group_size=8, num_steps=10, noise_level=0.7, cfg_scale=3.0,
      train_timesteps=config_dict.placeholder(int), updates_per_rollout=2, clip_range=1e-4, kl_weight=0.04,
      adv_clip=5.0,
  ))
  c.distill = ml_collections.ConfigDict(dict(
      guidance_min=1.0, guidance_max=6.0,  # guidance: student's w ~ U[min, max]
      cfg_scale=3.0,  # fewstep: the teacher's guidance scale (CFG, or its embedded guidance)
      student_steps=4,  # fewstep: Euler steps the student samples with
      teacher_substeps=12,  # fewstep: teacher Euler steps per student step
      # guidance, fewstep: where the student learns: at the noised data ('data'), or on-policy
      # at its own sampling states ('student': fewstep, after k of its steps; guidance, its ODE
      # from the noise in state_steps Euler steps), where it will be when it samples
      states="data",
      state_steps=4,
  ))

  c.model = ml_collections.ConfigDict(dict(
      name="mmdit",  # key of jdiff.models.MODELS
      variant="d12",  # mmdit: d<depth>; dit: S|B|L|XL/<patch>
      depth=config_dict.placeholder(int),  # overrides the variant's size table when set
      width=config_dict.placeholder(int),
      num_heads=config_dict.placeholder(int),
      patch_size=8,  # pixels per patch side
      in_channels=3,  # 3 for pixel space
      pos_embed_max_size=64,  # largest patch grid side the position table covers
      # Position interpolation: the patch grid side the positions were learned at (e.g. the
      # pre-training resolution's, set when fine-tuning at another); every grid then spans
      # that grid's extent, so tokens keep their place in the frame. 0: SD3's centred crop.
      pos_embed_interpolate=0,
      dtype="bfloat16",  # compute dtype
      param_dtype="float32",  # storage dtype of params and optimizer state
      attention="default",  # default | xla | cudnn | splash[:block] (TPU Pallas kernel, block 512)
      # Unrolled blocks: a faster GPU step, since under nn.scan XLA copies every saved
      # activation into its stacked buffer (benchmarks/hlo_cost.py shows the copies), at a
      # compile time that grows with depth; scan=True keeps compile time flat (deep models).
      scan=False,
      # none | full | dots | dots_no_batch | dots_no_batch_attention (+ cuDNN attention's
      # outputs) | dots_no_batch_attention_mlp (+ the MLP activations and LayerNorm statistics:
      # the fastest GPU step, at the most memory. Near the memory limit XLA recomputes on its
      # own, which is slower: then take dots_no_batch_attention)
      remat="dots_no_batch_attention_mlp",
      qk_norm=True,  # RMSNorm on queries and keys
      guidance_embed=config_dict.placeholder(bool),  # embed a guidance scale (guidance-distilled students)
      # Set by `python -m jdiff.convert` for imported SD3 models (None: the model's default):
      out_channels=config_dict.placeholder(int),
      pos_embed_base_size=config_dict.placeholder(int),  # SD3: sample_size // patch_size
      dual_attention_depth=config_dict.placeholder(int),  # SD3.5 Medium: 13
      # Conditioning widths; with text.encoder='bytes' they follow text.width.
      context_dim=config_dict.placeholder(int),
      pooled_dim=config_dict.placeholder(int),
  ))
  # Low-rank adapters on the denoiser's attention and MLP layers (rank 0: none). Train only
  # them with optim.trainable='.*lora_.*'; `python -m jdiff.convert export` merges them.
  # param_dtype: the adapters' (and so their Adam state's) storage dtype, kept apart from
  # model.param_dtype so a bfloat16 base trains float32 adapters ('' = model.param_dtype).
  # quantize_base: '' | int8 | float8_e4m3fn: the adapted layers' frozen kernels held in 8 bits
  # with a float32 scale per output channel (qwix), quantized from init_from's weights when the
  # run starts (QLoRA; README "Memory for a big frozen base"). Exports merge onto the dequantized kernels.
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=1.0, targets=r"(.*_)?blocks?(_\d+)?/.*(qkv2?/[qkv]|attn2?_out|mlp/fc[12]|mlp_in|out)",
                                          param_dtype="float32", quantize_base=""))
  # Pixel space (path '') or latent space: a diffusers AutoencoderKL directory (or a pipeline
  # directory with vae/). Latent-space runs train on a cache (`python -m jdiff.cache`).
  c.autoencoder = ml_collections.ConfigDict(dict(path="", dtype="float32"))
  c.text = ml_collections.ConfigDict(dict(
      # bytes (trainable, jdiff.models.text) | sd3 (frozen CLIP-L/G + T5, cached) | flux (frozen
      # CLIP-L pooled + T5 states, cached)
      encoder="bytes",
      pipeline="",  # sd3, flux: a local diffusers pipeline directory holding the text encoders
      t5_len=256,  # sd3, flux: T5 tokens per caption (diffusers' max_sequence_length; Flux-dev 512)
      width=512,  # token width = the denoiser's context and pooled input width
      depth=4,
      num_heads=8,
      max_len=64,  # BOS + caption bytes, cut beyond
      conv_kernel=5,  # bytes mixed by a 1D convolution before attention (0: off)
      downsample=1,  # adjacent byte states merged: max_len/downsample context tokens
      max_words=16,  # > 0: bytes pooled per space-separated word into this many tokens instead
      word_buckets=4096,  # with max_words: hashed whole-word embeddings (0: off)
      dtype="bfloat16",
      param_dtype="float32",
  ))
  c.data = ml_collections.ConfigDict(dict(
      # shapes | preference (embedded pairs, objective dpo) | folder | webdataset | parquet | tfds |
      # arrayrecord | cache (jdiff/data/sources.py, files.py)
      source="shapes",
      # folder / webdataset / parquet (and arrayrecord): where the data is: a directory, a file
      # pattern (glob wildcards, {a,b} and {000..009} braces) or several separated by commas
      path="",
      # folder: 'auto' = a same-name .txt (one caption per line, one picked per epoch; the same
      # for webdataset's .txt members), else a same-name .json's caption_key, else a root
      # metadata.jsonl/.json/.csv (file_name, caption_key); 'filename' = the file name
      caption_from="auto",
      missing_caption="skip",  # images without a caption: 'skip' (counted, logged) or 'empty'
      # Per-pixel loss weights (objective flow, pixel space): 'none'; 'alpha' = the image's alpha
      # channel; 'file' = a folder's NAME + mask_suffix beside each image (white: learn, black:
      # ignore; images without one are learnt whole). The loss is averaged over the weighted area.
      loss_mask="none",
      mask_suffix="-masklabel.png",  # folder: files with this ending are masks, never images
      # Aspect-ratio buckets (jdiff/data/buckets.py): pixels > 0 trains each image at the bucket
      # shape nearest its aspect ratio, about `pixels` pixels (e.g. 256 * 256), sides multiples of
      # `step` (a multiple of model.patch_size), ratios up to max_aspect:1 either way, instead of
      # data.resolution square (which sampling and evaluation still use). Every batch holds one
      # bucket; one train step compiles per bucket the data fills (at most max_buckets). Images
      # that would be upscaled by more than max_upscale to cover their bucket are left out.
      # Multi-resolution training instead (any source, square): sides = the resolutions, each
      # record drawn at one of them with `weights` (equal if empty), every batch at one side
      # (e.g. (24, 32) with (3, 1): a quarter of the batches at 32); sampling and evaluation
      # still use data.resolution.
      buckets=ml_collections.ConfigDict(dict(pixels=0, step=64, max_aspect=4.0, max_upscale=2.0, max_buckets=16,
                                             sides=(), weights=())),
      cache_dir="",  # source 'cache': a directory written by `python -m jdiff.cache`
      resolution=256,  # square training resolution (resize short side, centre-crop)
      caption_dropout=0.1,  # P(caption -> empty) for classifier-free guidance
      shapes_size=1_000_000,  # records in the embedded dataset (procedural)
      shapes_seed=0,
      # shapes/preference training split: train | new_color (adds 'pink') | held_out (the unseen
      # colour-shape pairs: captions-only objectives, as for 'prompts'; no image is read) |
      # web (pre-training data: images degraded and captions garbled at the rates of data.web)
      # | curated (clean renders, exact captions naming every attribute and the background)
      # | prompts (captions of every colour-shape pair, the unseen ones too, and the new colour
      # half the time: objectives that read captions only, grpo and on-policy distillation)
      shapes_split="train",
      # shapes_split='web': the chance of each image degradation and caption fault, each drawn
      # on its own per record (jdiff/data/degrade.py says what each does)
      web=ml_collections.ConfigDict(dict(noise=0.15, blur=0.1, jpeg=0.15, cast=0.1, clutter=0.08, occlusion=0.05,
                                         crop=0.08, wrong=0.05, missing=0.1)),
      # preference: a directory of on-policy pairs from `python -m jdiff.pairs` (rejected =
      # the model's own wrong samples); '' = embedded pairs (one attribute of the render changed)
      pairs_dir="",
      tfds_name="",  # e.g. 'my_captions', prepared with file_format='array_record'
      tfds_split="train",
      tfds_data_dir="",
      arrayrecord_pattern="",  # arrayrecord: as data.path (which it takes precedence over); kept for old configs
      image_key="image",  # feature (arrayrecord, tfds) or column (parquet) holding the encoded image
      caption_key="caption",  # feature / column / JSON field holding the caption text
      # grain read threads per process; -1: by source (pipeline.read_threads): 1 for the
      # embedded sources (rendered under the GIL: more threads contend and run slower),
      # 8 for tfds / arrayrecord / cache (file reads and image decoding release the GIL)
      read_threads=-1,
      prefetch=256,  # grain prefetch buffer (elements)
      num_workers=0,  # grain worker processes (0: threads in the main process)
      # elements a worker process prepares and sends at once (stacked: one transfer per
      # array; at most 16 MiB of them; the batches do not depend on it). Latent caches read
      # faster with threads
      worker_chunk=32,
  ))
  c.diffusion = ml_collections.ConfigDict(dict(
      prediction="v",  # v | eps | x0: what the network outputs
      weighting="none",  # none | eps | x0 | sigma_sqrt | cosmap
      timesteps=ml_collections.ConfigDict(dict(kind="logit_normal", mean=0.0, std=1.0, scale=1.29)),
      # sd3: s = factor*sqrt(seq_len/base_seq_len); flux: s = exp(mu(seq_len)); fixed; none.
      shift=ml_collections.ConfigDict(dict(kind="sd3", base_seq_len=256, factor=1.0, max_seq_len=4096,
                                           base_shift=0.5, max_shift=1.15, shift=1.0)),
      # The guidance input of a guidance-embedded model (Flux-dev) under the flow and dpo
      # losses. 1.0 (as Flux-dev fine-tuners use) leaves the distilled guidance range intact;
      # sample the result with its usual guidance (sample.cfg_scale, e.g. 3.5).
      guidance=1.0,
  ))
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, schedule="constant", warmup_steps=1000, end_lr_factor=0.0,  # end factor: cosine only
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
      ema_decay=0.9999, ema_warmup=True,
      # dtype of Adam's first moment: '' = the parameters' (float32); 'bfloat16' halves its
      # memory and traffic (the second moment stays in the parameters' dtype).
      mu_dtype="",
      # Regex over parameter paths ('denoiser/blocks_0/x_qkv/q/kernel', 'text/...'): only
      # matching parameters train; the rest stay bit-identical ('' = all). E.g. 'denoiser/.*'.
      trainable="",
  ))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=256,  # global batch
      num_steps=400_000,
      grad_accum=1,  # micro-batches per step
      log_every=100,
      checkpoint_every=5000,
      keep_checkpoints=3,
      # Resume from this step instead of the newest checkpoint that restores; newer ones are
      # moved to WORKDIR/checkpoints_aside/ (e.g. to go back before a divergence).
      restore_step=config_dict.placeholder(int),
      sample_every=5000,  # 0 disables sample grids
      max_nonfinite=10,  # stop after this many consecutive non-finite steps
  ))
  # Weights & Biases beside metrics.jsonl and TensorBoard (pip install 'jdiff[wandb]'): on when
  # project is set. mode 'offline' writes WORKDIR/wandb/ only (upload later with `wandb sync
  # WORKDIR/wandb/offline-run-*`); 'online' streams. A resumed run continues the same W&B run.
  c.wandb = ml_collections.ConfigDict(dict(project="", entity="", name="", mode="offline", tags=()))
  # cfg_scale: classifier-free guidance, or a guidance-embedded model's (Flux-dev) guidance
  # input. true_cfg_scale (such a model only, as diffusers' FluxPipeline names it): also
  # classifier-free guidance over the caption and the empty one (two forwards a step), for a
  # model fine-tuned with caption dropout and guidance input 1 (diffusion.guidance).
  c.sample = ml_collections.ConfigDict(dict(
      num_steps=28, method="euler", cfg_scale=5.0, true_cfg_scale=1.0, seed=0, batch_size=16,
      prompts=(
          "a large red circle in the top left",
          "a small blue square in the center",
          "a large green triangle at the bottom",
          "a small yellow square on the right",
          "a large purple circle in the bottom right",
          "a small orange triangle in the top right",
          "a large blue triangle on the left",  # held-out pair
          "a small yellow circle at the top",  # held-out pair
      ),
  ))
  # Evaluation of the EMA weights every N steps (0: never) and at the end of training, with
  # fixed noise and prompts; results go to metrics, workdir/eval.jsonl, TensorBoard and the
  # learning curve workdir/learning_curve.png. metrics: 'adherence' (the shapes caption
  # benchmark) and 'val_loss' (eval/validation.py) for runs on the shapes data (skipped
  # elsewhere); 'fid' and 'kid' for any run, against fid_stats (python -m jdiff.fid_stats)
  # with the FID Inception weights fid_weights, and 'clip_score' with the transformers CLIPModel
  # directory clip_model, from fid_samples generated images (prompted with the reference
  # statistics' captions, else the data's).
  c.eval = ml_collections.ConfigDict(dict(num_samples=64, num_steps=28, cfg_scale=5.0, method="euler", seed=0,
                                          every=0, at_end=True,
                                          metrics=("adherence", "val_loss"),
                                          val_examples=128,  # validation images (shapes, another seed)
                                          val_times=8,  # evenly spaced t of the validation loss
                                          fid_stats="", fid_weights="", fid_samples=1000, clip_model=""))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding = ml_collections.ConfigDict(dict(logical_rules=LOGICAL_RULES))
  return c


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
  """['section.field=value', ...] -> {'section.field': value}, for a config's
  update_from_flattened_dict (benchmark scripts); values are Python literals or plain strings."""
  overrides = {}
  for item in items:
    key, _, value = item.partition("=")
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value  # a plain string
  return overrides


def load(spec: str) -> ml_collections.ConfigDict:
  """'path/to/config.py[:arg]' -> its get_config(arg), locked: what --config=spec gives
  jdiff.main, for notebooks, benchmarks and tests."""
  path, sep, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise errors.NotFound(f"no config file {path!r} (from {spec!r})")
  module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  c = module.get_config(arg) if sep else module.get_config()
  c.lock()
  return c


INHERITED = ("model", "text", "autoencoder")
# Fields of those sections that say how to run, not what the model is: kept from the config.
RUNTIME_FIELDS = ("dtype", "param_dtype", "attention", "remat", "t5_len")


def field_comments() -> dict[str, str]:
  """'section.field' (and 'section') -> the comment that documents it in base()'s source: the
  comment lines just above it (when it starts its own line) and the comment ending its line."""
  import inspect  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import tokenize  # pylint: disable=g-import-not-at-top

  source = inspect.getsource(base)
  lines = source.splitlines()
  tokens = tokenize.generate_tokens(io.StringIO(source).readline)
  trailing = {tok.start[0]: tok.string.lstrip("#").strip() for tok in tokens
              if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1][:tok.start[1]].strip()}

  def comment(lineno: int, own_line: bool) -> str:
    above, j = [], lineno - 2
    while own_line and j >= 0 and lines[j].strip().startswith("#"):
      above.insert(0, lines[j].strip().lstrip("#").strip())
      j -= 1
    return " ".join(above + ([trailing[lineno]] if lineno in trailing else []))

  def fields(call: ast.AST, prefix: str, statement_line: int, out: dict[str, str]) -> None:
    """The keywords of ConfigDict(dict(...)) / dict(...) under `prefix`, recursively."""
    while isinstance(call, ast.Call) and call.args and isinstance(call.args[0], ast.Call):
      call = call.args[0]  # ConfigDict(dict(...)) -> dict(...)
    if not isinstance(call, ast.Call):
      return
    for kw in call.keywords:
      if kw.arg is None:
        continue
      own = kw.lineno != statement_line and all(k.lineno != kw.lineno for k in call.keywords if k is not kw)
      out[prefix + kw.arg] = comment(kw.lineno, own)
      if isinstance(kw.value, ast.Call) and getattr(kw.value.func, "attr", "") == "ConfigDict":
        fields(kw.value, f"{prefix}{kw.arg}.", kw.lineno, out)

  out: dict[str, str] = {}
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
      name = node.targets[0].attr
      out[name] = comment(node.lineno, True)
      if isinstance(node.value, ast.Call) and getattr(node.value.func, "attr", "") == "ConfigDict":
        fields(node.value, name + ".", node.lineno, out)
  return {k: v for k, v in out.items() if v}


def describe(config: ml_collections.ConfigDict) -> str:
  """Every field of `config` with its value and, where base() documents it, its comment; a
  section's own comment heads it."""
  comments, out, seen = field_comments(), [], set()
  for path, value in _flatten(config):
    parts = path.split(".")
    for prefix in (".".join(parts[:i]) for i in range(1, len(parts))):
      if prefix not in seen:
        seen.add(prefix)
        if prefix in comments:
          out.append(f"# {prefix}: {comments[prefix]}")
    out.append(f"{path} = {value!r}" + (f"  # {comments[path]}" if path in comments else ""))
  return "\n".join(out)


def _flatten(config: Any, prefix: str = "") -> list[tuple[str, Any]]:
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.extend(_flatten(value, f"{prefix}{key}."))
    else:
      out.append((prefix + key, value))
  return out
