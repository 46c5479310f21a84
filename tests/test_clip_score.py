"""CLIP score (jdiff/eval/clip_score.py): the CLIP vision tower and the CLIP model's text tower
against transformers' CLIPModel on random weights, the preprocessing against its
CLIPImageProcessor, and the score against torchmetrics' formula."""

import numpy as np
import pytest
import torch

from jdiff.eval import clip_score

import sd3_fixture

PROMPTS = ["a red circle", "a blue square at the top", "a green triangle", "an orange square on the left"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """A tiny random transformers CLIPModel saved with its tokenizer."""
  from transformers import CLIPConfig, CLIPModel

  path = str(tmp_path_factory.mktemp("clip"))
  tokenizer, vocab = sd3_fixture.clip_tokenizer(path, pad="!")
  tokenizer.save_pretrained(path)
  text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=sd3_fixture.CLIP_MAX_LEN, bos_token_id=tokenizer.bos_token_id,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4)
  torch.manual_seed(0)
  model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
  with torch.no_grad():  # non-trivial LayerNorms
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return path, model, tokenizer


def _features(out):
  return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()


def test_preprocessing_matches_clip_image_processor():
  from transformers import CLIPImageProcessorPil

  processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  rng = np.random.default_rng(0)
  for shape in ((48, 80, 3), (90, 40, 3), (32, 32, 3), (17, 23, 3)):
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    theirs = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(clip_score.preprocess(image[None], 32)[0], theirs, atol=1e-5)


def test_embeddings_and_score_match_transformers(clip_dir):
  from transformers import CLIPImageProcessorPil

  path, model, tokenizer = clip_dir
  scorer = clip_score.ClipScorer.load(path, batch_size=3)  # two batches, the last padded
  images = np.random.default_rng(1).integers(0, 256, (4, 40, 56, 3), dtype=np.uint8)
  processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  pixels = torch.from_numpy(processor(images=list(images), return_tensors="np")["pixel_values"])
  ids = tokenizer(PROMPTS, padding="max_length", max_length=sd3_fixture.CLIP_MAX_LEN, truncation=True,
                  return_tensors="pt").input_ids
  with torch.no_grad():
    theirs_image = _features(model.get_image_features(pixel_values=pixels))
    theirs_text = _features(model.get_text_features(input_ids=ids))
  ours_image, ours_text = scorer.image_embeds(images), scorer.text_embeds(PROMPTS)
  np.testing.assert_allclose(ours_image, theirs_image, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ours_text, theirs_text, rtol=1e-4, atol=1e-5)
  # torchmetrics: 100 * max(cos, 0) per pair
  cos = torch.nn.functional.cosine_similarity(torch.from_numpy(theirs_image), torch.from_numpy(theirs_text)).numpy()
  np.testing.assert_allclose(scorer(images, PROMPTS), 100 * np.maximum(cos, 0), rtol=1e-4, atol=1e-4)


def test_score_is_clipped_at_zero_and_scale_free():
  a = np.array([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
  b = np.array([[-1.0, 0.0], [2.0, 2.0], [1.0, 1.0]])
  np.testing.assert_allclose(clip_score.score(a, b), [0.0, 100.0, 100 / np.sqrt(2)])


@pytest.mark.heavy
def test_clip_score_in_the_loop_equals_scoring_the_final_models_images(clip_dir, tmp_path):
  """eval.metrics=('clip_score',): the logged score is the CLIP score of the EMA model's images
  for the data's first captions, as jdiff.evaluate computes it from the finished run."""
  import json

  import helpers
  import test_train
  from jdiff import inference
  from jdiff.eval import curves, quality

  path = clip_dir[0]
  config = test_train.get_config(train__sample_every=0, train__num_steps=2, eval__at_end=True,
                                 eval__metrics=("clip_score",), eval__clip_model=path, eval__fid_samples=4)
  summary = test_train.run(config, tmp_path / "run")
  (logged,) = curves.read_jsonl(str(tmp_path / "run" / "eval.jsonl"))
  assert set(logged) == {"step", "clip_score"} and summary["eval"]["clip_score"] == logged["clip_score"]
  model = inference.load(str(tmp_path / "run"))
  prompts = quality.prompts_for(4, None, config.data)
  e = config.eval
  images = inference.generate(model, prompts, num_steps=e.num_steps, cfg_scale=e.cfg_scale, method=e.method,
                              seed=e.seed)
  expected = float(np.mean(clip_score.ClipScorer.load(path)(images, prompts)))
  assert logged["clip_score"] == pytest.approx(expected, rel=1e-5) and 0 <= expected <= 100
  out = helpers.cli("jdiff.evaluate", f"--workdir={tmp_path / 'run'}", "--metrics=clip_score",
                    f"--clip_model={path}", "--num_samples=4")
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["n"] == 4 and result["clip_score"] == pytest.approx(expected, rel=1e-5)
  # At another shape the model takes (a non-square one): the images are generated at it.
  wide = inference.generate(model, prompts[:2], num_steps=e.num_steps, cfg_scale=e.cfg_scale, method=e.method,
                            seed=e.seed, resolution=(8, 24))
  assert wide.shape[1:3] == (8, 24)
  out = helpers.cli("jdiff.evaluate", f"--workdir={tmp_path / 'run'}", "--metrics=clip_score",
                    f"--clip_model={path}", "--num_samples=2", "--height=8", "--width=24")
  result = json.loads(out.stdout.strip().splitlines()[-1])
  expected = float(np.mean(clip_score.ClipScorer.load(path)(wide, prompts[:2])))
  assert result["clip_score"] == pytest.approx(expected, rel=1e-5)
