"""Text encoders against transformers: CLIP text (with and without projection) and T5
encoder, tiny random models in float32, plus lossless import/export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jdiff.interop import clip as clip_io
from jdiff.interop import mapping
from jdiff.interop import t5 as t5_io
from jdiff.models import clip, t5

import helpers




assert_parity = helpers.assert_parity


state_dict = helpers.torch_state_dict


def round_trip(sd, back):
  assert set(back) == set(sd)
  for key in sd:
    assert back[key].dtype == sd[key].dtype and back[key].shape == sd[key].shape, key
    np.testing.assert_array_equal(back[key], sd[key], err_msg=key)


CLIP_CASES = {
    # OpenAI CLIP-L style (quick_gelu), and OpenCLIP bigG style (gelu) with a projection.
    "clip-l": dict(hidden_act="quick_gelu", projection=False),
    "clip-g": dict(hidden_act="gelu", projection=True),
}


def clip_reference(case, seed=0):
  torch.manual_seed(seed)
  c = CLIP_CASES[case]
  config = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, max_position_embeddings=16, hidden_act=c["hidden_act"],
                                       projection_dim=24, eos_token_id=98, pad_token_id=98, bos_token_id=97)
  cls = transformers.CLIPTextModelWithProjection if c["projection"] else transformers.CLIPTextModel
  model = cls(config).eval()
  helpers.randomize_norms(model)
  return model


def clip_ids(batch=3, length=16, seed=0):
  """Token ids with an end-of-text token (98) at varying positions, padded with it after."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 97, size=(batch, length))
  ids[:, 0] = 97
  for b, end in enumerate(rng.integers(2, length, size=batch)):
    ids[b, end:] = 98
  return ids


@pytest.mark.parametrize("case", list(CLIP_CASES))
def test_clip_text_matches_transformers(case):
  ref = clip_reference(case)
  config = ref.config.to_dict()
  config["architectures"] = [type(ref).__name__]
  params = clip_io.to_jdiff(config, state_dict(ref))
  model = clip.CLIPText(**clip_io.model_kwargs(config))
  ids = clip_ids()
  ours = model.apply({"params": jax.tree.map(jnp.asarray, params)}, jnp.asarray(ids))
  with torch.no_grad():
    theirs = ref(input_ids=torch.from_numpy(ids), output_hidden_states=True)
  assert len(ours["hidden_states"]) == len(theirs.hidden_states) == 4
  # SD3 reads the penultimate layer's states.
  assert_parity(ours["hidden_states"][-2], theirs.hidden_states[-2])
  assert_parity(ours["last_hidden_state"], theirs.last_hidden_state)
  if CLIP_CASES[case]["projection"]:
    assert_parity(ours["text_embeds"], theirs.text_embeds)
  else:
    assert_parity(ours["pooled"], theirs.pooler_output)
  sd = state_dict(ref)
  round_trip(sd, clip_io.to_transformers(config, params, prefix=clip_io.key_prefix(sd)))


def test_clip_export_in_hub_layout_loads_in_transformers(tmp_path):
  ref = clip_reference("clip-g", seed=2)
  config = ref.config.to_dict()
  config["architectures"] = [type(ref).__name__]
  params = clip_io.to_jdiff(config, state_dict(ref))
  ref.config.save_pretrained(tmp_path)
  mapping.save_safetensors(clip_io.to_transformers(config, params), str(tmp_path), config, "model.safetensors")
  loaded = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path).eval()
  round_trip(state_dict(ref), state_dict(loaded))
  # Hub-layout files import back to the same params.
  again = clip_io.to_jdiff(config, mapping.load_safetensors(str(tmp_path)))
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_clip_padding_mask_matches_transformers():
  ref = clip_reference("clip-l", seed=1)
  config = ref.config.to_dict()
  params = clip_io.to_jdiff(config, state_dict(ref))
  ids = clip_ids(seed=1)
  mask = (np.cumsum(ids == 98, axis=1) <= 1).astype(np.int64)  # keep up to the first end token
  ours = clip.CLIPText(**clip_io.model_kwargs(config)).apply(
      {"params": jax.tree.map(jnp.asarray, params)}, jnp.asarray(ids), jnp.asarray(mask))
  with torch.no_grad():
    theirs = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  keep = mask.astype(bool)  # padded positions are undefined in both
  assert_parity(np.asarray(ours["last_hidden_state"])[keep], theirs.last_hidden_state.numpy()[keep])


# --- T5 --------------------------------------------------------------------------------

T5_CASES = {"t5-v1.1": "gated-gelu", "t5": "relu"}


def t5_reference(case, seed=0):
  torch.manual_seed(seed)
  config = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                                 feed_forward_proj=T5_CASES[case], relative_attention_num_buckets=8,
                                 relative_attention_max_distance=20)
  model = transformers.T5EncoderModel(config).eval()
  helpers.randomize_norms(model)
  return model


def test_t5_relative_position_buckets_match_transformers():
  from transformers.models.t5.modeling_t5 import T5Attention
  for length, buckets, distance in [(300, 32, 128), (40, 8, 20)]:
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    theirs = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=buckets,
                                                   max_distance=distance).numpy()
    np.testing.assert_array_equal(t5.relative_position_buckets(length, buckets, distance), theirs)


@pytest.mark.parametrize("case", list(T5_CASES))
def test_t5_encoder_matches_transformers(case):
  ref = t5_reference(case)
  config = ref.config.to_dict()
  sd = state_dict(ref)
  params = t5_io.to_jdiff(config, sd)
  model = t5.T5Encoder(**t5_io.model_kwargs(config))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 99, size=(2, 24))
  mask = np.ones_like(ids)
  mask[1, 15:] = 0
  for m in (None, mask):
    ours = model.apply({"params": jax.tree.map(jnp.asarray, params)}, jnp.asarray(ids),
                       None if m is None else jnp.asarray(m))["last_hidden_state"]
    with torch.no_grad():
      theirs = ref(input_ids=torch.from_numpy(ids),
                   attention_mask=None if m is None else torch.from_numpy(m)).last_hidden_state.numpy()
    keep = np.ones(ids.shape, bool) if m is None else m.astype(bool)
    assert_parity(np.asarray(ours)[keep], theirs[keep])
  back = t5_io.to_transformers(config, params)
  round_trip({k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}, back)


def test_t5_export_loads_in_transformers(tmp_path):
  ref = t5_reference("t5-v1.1", seed=3)
  config = ref.config.to_dict()
  params = t5_io.to_jdiff(config, state_dict(ref))
  ref.config.save_pretrained(tmp_path)
  mapping.save_safetensors(t5_io.to_transformers(config, params), str(tmp_path), config, "model.safetensors")
  loaded = transformers.T5EncoderModel.from_pretrained(tmp_path).eval()
  round_trip(state_dict(ref), state_dict(loaded))
