"""A whole (tiny) SD3 pipeline directory: jdiff's text conditioning and VAE against diffusers'
StableDiffusion3Pipeline on the same prompts and images."""

import pytest
import torch

from jdiff.interop import sd3_pipeline

import sd3_fixture

import helpers


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sd3"))
  return path, sd3_fixture.make_pipeline(path)


PROMPTS = ["a large red circle in the top left", "", "a small blue zebra square at the bottom right of it all"]


assert_parity = helpers.assert_parity


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_prompt_encoding_matches_the_diffusers_pipeline(tmp_path, with_t5):
  pipe = sd3_fixture.make_pipeline(str(tmp_path), seed=1, with_t5=with_t5)
  encoder = sd3_pipeline.SD3TextEncoder.load(str(tmp_path), t5_len=sd3_fixture.T5_MAX_LEN)
  ours = encoder.encode(PROMPTS)
  with torch.no_grad():
    context, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                               max_sequence_length=sd3_fixture.T5_MAX_LEN)
  assert ours["context"].shape == (3, sd3_fixture.CLIP_MAX_LEN + sd3_fixture.T5_MAX_LEN, 32)
  assert_parity(ours["context"], context.numpy())
  assert_parity(ours["pooled"], pooled.numpy())
  assert encoder.pooled_dim == 20 and encoder.context_len == ours["context"].shape[1]
