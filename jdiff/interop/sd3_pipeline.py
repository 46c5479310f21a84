"""A local diffusers Stable Diffusion 3 or Flux pipeline directory as jdiff modules and params.

    transformer/        SD3Transformer2DModel  -> load_transformer: jdiff MMDiT
    vae/                AutoencoderKL          -> load_vae: jdiff AutoencoderKL
    text_encoder(_2)/   CLIP-L, CLIP-G (with projection)  \
    text_encoder_3/     T5 encoder (optional)              > SD3TextEncoder: prompts -> conditioning
    tokenizer(_2,_3)/   Hugging Face tokenizer files      /

The conditioning follows the SD3 recipe (and diffusers' StableDiffusion3Pipeline.encode_prompt):
the penultimate hidden states of both CLIPs, concatenated along features and zero-padded
to the T5 width, then the T5 states appended along the sequence -> context
[B, 77 + t5_len, 4096]; the two projected CLIP pooled vectors concatenated -> pooled
[B, 2048]. Flux's recipe (FluxPipeline.encode_prompt): the T5 last hidden states alone ->
context [B, t5_len, 4096] (diffusers' max_sequence_length: 512 for dev, 256 for schnell),
and the CLIP-L pooled output (its final-norm EOS state, no projection) -> pooled [B, 768].
Nothing is downloaded: every file must be in the directory.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.interop import clip as clip_io
from jdiff.interop import mapping as M
from jdiff.interop import sd3 as sd3_io
from jdiff.interop import t5 as t5_io
from jdiff.interop import vae as vae_io
from jdiff.models import clip, t5, vae
from jdiff.models import layers as L


def component_dir(path: str, name: str) -> str:
  """`path`/`name` for a pipeline directory, or `path` itself when it is the component's own directory."""
  sub = os.path.join(path, name)
  if os.path.exists(os.path.join(sub, "config.json")):
    return sub
  if os.path.exists(os.path.join(path, "config.json")) and not os.path.exists(os.path.join(path, "model_index.json")):
    return path
  raise FileNotFoundError(f"no {name}/config.json under {path!r}: expected a local diffusers pipeline directory")


def _load(path: str, name: str, io):
  d = component_dir(path, name)
  config = M.read_config(d)
  return config, jax.tree.map(jnp.asarray, io.to_jdiff(config, M.load_safetensors(d)))


def load_transformer(path: str) -> tuple[dict[str, Any], dict[str, Any], dict]:
  """(diffusers config, jdiff MMDiT kwargs, params in the unrolled layout)."""
  config, params = _load(path, "transformer", sd3_io)
  return config, sd3_io.model_kwargs(config), params


def vae_geometry(path: str) -> dict[str, Any]:
  """{'factor': pixels per latent, 'channels', 'scaling_factor', 'shift_factor'} of a VAE directory."""
  config = M.read_config(component_dir(path, "vae"))
  kwargs = vae_io.model_kwargs(config)
  return dict(factor=2 ** (len(kwargs["channels"]) - 1), channels=kwargs["latent_channels"],
              scaling_factor=kwargs["scaling_factor"], shift_factor=kwargs["shift_factor"])


def load_vae(path: str, dtype: str = "float32") -> tuple[vae.AutoencoderKL, dict]:
  config, params = _load(path, "vae", vae_io)
  kwargs = vae_io.model_kwargs(config)
  return vae.AutoencoderKL(**kwargs, dtype=L.as_dtype(dtype)), {"params": params}


def load_tokenizer(path: str):
  """Hugging Face tokenizer files in `path` (needs transformers; nothing is downloaded)."""
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading Hugging Face tokenizer files needs transformers: pip install 'jdiff[hf]'") from e
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


@dataclasses.dataclass
class SD3TextEncoder:
  """CLIP-L + CLIP-G (+ T5) with their tokenizers: prompts -> {'context', 'pooled'} (float32 numpy)."""

  tokenizers: tuple
  modules: tuple
  params: dict
  clip_len: int
  t5_len: int
  context_dim: int

  @property
  def pooled_dim(self) -> int:
    return sum(m.projection_dim for m in self.modules[:2])

  @property
  def context_len(self) -> int:
    return self.clip_len + self.t5_len

  @classmethod
  def load(cls, path: str, t5_len: int = 256, dtype: str = "float32") -> "SD3TextEncoder":
    """From a pipeline directory; `t5_len` is the T5 token count (diffusers' max_sequence_length)."""
    toks, mods, params = [], [], {}
    for i, suffix in enumerate(("", "_2")):
      config, p = _load(path, f"text_encoder{suffix}", clip_io)
      kwargs = clip_io.model_kwargs(dict(config, architectures=["CLIPTextModelWithProjection"]))
      mods.append(clip.CLIPText(**kwargs, dtype=L.as_dtype(dtype)))
      params[f"clip_{i}"] = p
      toks.append(load_tokenizer(os.path.join(path, f"tokenizer{suffix}")))
    try:
      config, p = _load(path, "text_encoder_3", t5_io)
    except FileNotFoundError:
      mods.append(None)  # SD3 without T5: zeros in its place, as diffusers does
      toks.append(None)
    else:
      mods.append(t5.T5Encoder(**t5_io.model_kwargs(config), dtype=L.as_dtype(dtype)))
      params["t5"] = p
      toks.append(load_tokenizer(os.path.join(path, "tokenizer_3")))
    context_dim = M.read_config(component_dir(path, "transformer"))["joint_attention_dim"]
    return cls(tuple(toks), tuple(mods), params, toks[0].model_max_length, t5_len, context_dim)

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, ...]:
    clip_kw = dict(padding="max_length", max_length=self.clip_len, truncation=True)
    ids = [np.asarray(tok(list(prompts), **clip_kw).input_ids, np.int32) for tok in self.tokenizers[:2]]
    if self.tokenizers[2] is not None:
      ids.append(np.asarray(self.tokenizers[2](list(prompts), padding="max_length", max_length=self.t5_len,
                                               truncation=True, add_special_tokens=True).input_ids, np.int32))
    return tuple(ids)

  @functools.cached_property
  def _encode(self):
    clip_l, clip_g, t5_model = self.modules

    @jax.jit
    def run(params, ids):
      outs = [m.apply({"params": params[f"clip_{i}"]}, ids[i]) for i, m in enumerate((clip_l, clip_g))]
      clip_ctx = jnp.concatenate([o["hidden_states"][-2] for o in outs], axis=-1)
      clip_ctx = jnp.pad(clip_ctx, ((0, 0), (0, 0), (0, self.context_dim - clip_ctx.shape[-1])))
      if t5_model is None:
        t5_ctx = jnp.zeros((clip_ctx.shape[0], self.t5_len, self.context_dim), clip_ctx.dtype)
      else:
        t5_ctx = t5_model.apply({"params": params["t5"]}, ids[2])["last_hidden_state"]
      context = jnp.concatenate([clip_ctx, t5_ctx.astype(clip_ctx.dtype)], axis=1)
      pooled = jnp.concatenate([o["text_embeds"] for o in outs], axis=-1)
      return dict(context=context.astype(jnp.float32), pooled=pooled.astype(jnp.float32))

    return run

  def encode(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """prompts (N strings) -> {'context': [N, clip_len + t5_len, context_dim], 'pooled': [N, pooled_dim]}."""
    return jax.device_get(self._encode(self.params, self.tokenize(prompts)))


@dataclasses.dataclass
class FluxTextEncoder:
  """CLIP-L + T5 of a Flux pipeline with their tokenizers: prompts -> {'context': T5 states
  [N, t5_len, D], 'pooled': CLIP-L pooled output [N, 768]} (float32 numpy)."""

  tokenizers: tuple
  modules: tuple
  params: dict
  clip_len: int
  t5_len: int

  @property
  def pooled_dim(self) -> int:
    return self.modules[0].width

  @property
  def context_len(self) -> int:
    return self.t5_len

  @classmethod
  def load(cls, path: str, t5_len: int = 512, dtype: str = "float32") -> "FluxTextEncoder":
    config, clip_params = _load(path, "text_encoder", clip_io)
    clip_l = clip.CLIPText(**clip_io.model_kwargs(dict(config, architectures=["CLIPTextModel"])),
                           dtype=L.as_dtype(dtype))
    config, t5_params = _load(path, "text_encoder_2", t5_io)
    t5_model = t5.T5Encoder(**t5_io.model_kwargs(config), dtype=L.as_dtype(dtype))
    toks = (load_tokenizer(os.path.join(path, "tokenizer")), load_tokenizer(os.path.join(path, "tokenizer_2")))
    return cls(toks, (clip_l, t5_model), {"clip": clip_params, "t5": t5_params}, toks[0].model_max_length, t5_len)

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    clip_ids = self.tokenizers[0](list(prompts), padding="max_length", max_length=self.clip_len, truncation=True)
    t5_ids = self.tokenizers[1](list(prompts), padding="max_length", max_length=self.t5_len, truncation=True)
    return np.asarray(clip_ids.input_ids, np.int32), np.asarray(t5_ids.input_ids, np.int32)

  @functools.cached_property
  def _encode(self):
    clip_l, t5_model = self.modules

    @jax.jit
    def run(params, ids):
      pooled = clip_l.apply({"params": params["clip"]}, ids[0])["pooled"]
      context = t5_model.apply({"params": params["t5"]}, ids[1])["last_hidden_state"]
      return dict(context=context.astype(jnp.float32), pooled=pooled.astype(jnp.float32))

    return run

  def encode(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """prompts (N strings) -> {'context': [N, t5_len, D], 'pooled': [N, 768]}."""
    return jax.device_get(self._encode(self.params, self.tokenize(prompts)))


TEXT_RECIPES = {"sd3": SD3TextEncoder, "flux": FluxTextEncoder}  # config.text.encoder -> frozen encoders


def load_text_encoder(kind: str, path: str, t5_len: int, dtype: str = "float32"):
  """The frozen text encoders of config.text.encoder `kind` from pipeline `path`."""
  if kind not in TEXT_RECIPES:
    raise ValueError(f"text encoder {kind!r} is not a pipeline's frozen encoders; expected one of {tuple(TEXT_RECIPES)}")
  return TEXT_RECIPES[kind].load(path, t5_len=t5_len, dtype=dtype)
