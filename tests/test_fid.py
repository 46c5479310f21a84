"""FID and KID (jdiff/eval/fid.py): the FID InceptionV3 against torch-fidelity's PyTorch port of
the same TensorFlow graph (random weights, through a .pth file as the real weights come), the
resizers against torch-fidelity's TF1 bilinear and clean-fid's PIL bicubic, the distances
against hand-computed values and independent computations of the reference formulas (the
reference tools' metric modules import torchvision, whose PyPI wheels need CUDA torch)."""

import importlib
import importlib.util
import sys
import types

import jax
import numpy as np
import pytest
import torch

from jdiff.eval import fid
from jdiff.interop import inception as inception_io
from jdiff.models import inception

pytestmark = pytest.mark.xdist_group("cpu_heavy")  # with test_multihost.py, never beside it


@pytest.fixture
def torch_fidelity(monkeypatch):
  """torch-fidelity's modules without its package __init__, which imports torchvision (whose
  PyPI wheels need CUDA torch; the modules used here need only torch)."""
  spec = importlib.util.find_spec("torch_fidelity")
  package = types.ModuleType("torch_fidelity")
  package.__path__ = list(spec.submodule_search_locations)
  monkeypatch.setitem(sys.modules, "torch_fidelity", package)
  names = ("feature_extractor_inceptionv3", "interpolate_compat_tensorflow")
  return types.SimpleNamespace(**{n: importlib.import_module(f"torch_fidelity.{n}") for n in names})


def _random_params(seed=0):
  """InceptionV3 params with every batch-norm statistic random (not the identity init)."""
  params = inception.InceptionV3(logits=True).init(jax.random.key(seed), np.zeros((1, 75, 75, 3), np.float32))
  rng = np.random.default_rng(seed)

  def randomise(path, x):
    name = path[-1].key
    if name == "scale":
      return rng.uniform(1.0, 2.0, x.shape).astype(np.float32)
    if name in ("bias", "mean"):
      return rng.normal(0.0, 0.2, x.shape).astype(np.float32)
    if name == "var":
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    return np.asarray(x)

  return jax.tree_util.tree_map_with_path(randomise, params["params"])


def test_inception_matches_torch_fidelity_on_random_weights_read_from_a_pth_file(torch_fidelity, tmp_path):
  params = _random_params()
  state = {k: torch.from_numpy(v.copy()) for k, v in inception_io.export_state_dict(params).items()}
  path = str(tmp_path / "inception.pth")
  torch.save(state, path)
  loaded = inception_io.load_params(path)  # the FID network needs no classifier
  assert "fc" not in loaded
  same = jax.tree.map(np.array_equal, loaded, {k: v for k, v in params.items() if k != "fc"})
  assert all(jax.tree.leaves(same))
  reference = torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3(
      "inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
  images = np.random.default_rng(1).integers(0, 256, (3, 90, 70, 3), dtype=np.uint8)  # resized to 299 inside
  with torch.no_grad():
    (theirs,) = reference(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
  ours = fid.Features(loaded, resize="tf1_bilinear", batch_size=2)(images)  # two batches, the last padded
  theirs = theirs.numpy()
  assert ours.shape == (3, inception.POOL_FEATURES) and np.abs(theirs).mean() > 1e-2
  assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_tf1_bilinear_matches_torch_fidelity(torch_fidelity):
  rng = np.random.default_rng(0)
  for shape in ((2, 37, 53, 3), (1, 300, 512, 3), (1, 299, 299, 3)):
    images = rng.uniform(0, 255, shape).astype(np.float32)
    ours = np.asarray(fid.tf1_bilinear(images))
    theirs = torch_fidelity.interpolate_compat_tensorflow.interpolate_bilinear_2d_like_tensorflow1x(
        torch.from_numpy(images).permute(0, 3, 1, 2), size=(299, 299), align_corners=False)
    np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), atol=1e-3)
  np.testing.assert_array_equal(fid.tf1_bilinear(images), images)  # 299 -> 299 is the identity


def test_pil_bicubic_matches_clean_fid():
  from cleanfid import resize as cleanfid_resize

  resizer = cleanfid_resize.make_resizer("PIL", False, "bicubic", (299, 299))
  images = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
  ours = fid.pil_bicubic(images)
  for mine, image in zip(ours, images):
    np.testing.assert_array_equal(mine, resizer(image))


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)  # 5 + 1 + 0 + 4
  assert fid.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)
  assert expected == 10.0


def test_frechet_distance_matches_the_eigenvalue_form_and_grows_with_noise():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16))
  b = a[::-1] + 0.3 * rng.standard_normal(a.shape)
  (mu_a, s_a), (mu_b, s_b) = fid.statistics(a), fid.statistics(b)
  np.testing.assert_allclose(s_a, np.cov(a.T), rtol=1e-12)
  # tr sqrtm(S_a S_b) = sum of the square roots of the eigenvalues of S_a S_b (torch-fidelity's form)
  trace_root = np.sum(np.sqrt(np.linalg.eigvals(s_a @ s_b).astype(complex)).real)
  expected = np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * trace_root
  assert fid.frechet_distance(mu_a, s_a, mu_b, s_b) == pytest.approx(expected, rel=1e-8)
  assert abs(fid.frechet_distance(mu_a, s_a, mu_a, s_a)) < 1e-6  # a set against itself
  distances = [fid.frechet_distance(mu_a, s_a, *fid.statistics(a + s * rng.standard_normal(a.shape)))
               for s in (0.1, 0.5, 1.0, 2.0)]
  assert distances == sorted(distances) and distances[0] > 0


def test_polynomial_mmd_is_the_u_statistic_and_kid_is_unbiased():
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((12, 5)), rng.standard_normal((9, 5)) + 0.2
  k = lambda a, b: (a @ b / 5 + 1) ** 3
  within = lambda s: sum(k(s[i], s[j]) for i in range(len(s)) for j in range(len(s)) if i != j) / (len(s) * (len(s) - 1))
  expected = within(x) + within(y) - 2 * np.mean([k(a, b) for a in x for b in y])
  assert fid.polynomial_mmd2(x, y) == pytest.approx(expected, rel=1e-10)
  # One subset of the whole of each (equal-sized) set: KID's mean is that MMD, whatever the order.
  assert fid.kid(x[:9], y, num_subsets=1, subset_size=9)[0] == pytest.approx(fid.polynomial_mmd2(x[:9], y), rel=1e-10)
  # Unbiased: two samples of one distribution average to 0 (the biased V-statistic would not).
  pairs = [(rng.standard_normal((6, 3)), rng.standard_normal((6, 3))) for _ in range(3000)]
  draws = [fid.polynomial_mmd2(a, b) for a, b in pairs]
  assert abs(np.mean(draws)) < 3 * np.std(draws) / np.sqrt(len(draws))
  kernel = lambda a, b: (a @ b.T / 3 + 1) ** 3
  biased = [kernel(a, a).mean() + kernel(b, b).mean() - 2 * kernel(a, b).mean() for a, b in pairs]
  assert np.mean(biased) > 10 * np.std(biased) / np.sqrt(len(biased))


def test_stats_files_round_trip_and_read_pytorch_fid_layout(tmp_path):
  mu, sigma = fid.statistics(np.random.default_rng(0).standard_normal((20, 4)))
  fid.save_stats(str(tmp_path / "ours.npz"), mu, sigma, resize="tf1_bilinear", num_images=20)
  got = fid.load_stats(str(tmp_path / "ours.npz"))
  np.testing.assert_array_equal(got[0], mu) and np.testing.assert_array_equal(got[1], sigma)
  np.savez(tmp_path / "theirs.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))  # pytorch-fid's
  assert fid.load_stats(str(tmp_path / "theirs.npz"))[1].dtype == np.float64
  np.savez(tmp_path / "bad.npz", arr_0=mu)
  with pytest.raises(ValueError, match="no 'mu' and 'sigma'"):
    fid.load_stats(str(tmp_path / "bad.npz"))


def test_fid_stats_and_evaluate_through_the_cli(tmp_path, tiny_run):
  """jdiff.fid_stats on the embedded shapes data, then jdiff.evaluate --metrics=fid,kid on a tiny
  run against those statistics (random Inception weights, given as .safetensors)."""
  import json

  from safetensors.numpy import save_file

  import helpers
  from jdiff import config as config_lib

  weights, stats = str(tmp_path / "inception.safetensors"), str(tmp_path / "stats.npz")
  save_file(inception_io.export_state_dict(_random_params()), weights)
  test = "--config=configs/mmdit_256.py:test"
  out = helpers.cli("jdiff.fid_stats", test, f"--weights={weights}", f"--out={stats}", "--num_images=12",
                    "--batch_size=8")
  assert json.loads(out.stdout.strip().splitlines()[-1])["num_images"] == 12
  with np.load(stats) as f:
    feats, captions, mu, sigma = f["features"], f["captions"], f["mu"], f["sigma"]
    assert str(f["resize"]) == "tf1_bilinear" and int(f["num_images"]) == 12
  assert feats.shape == (12, inception.POOL_FEATURES) and len(captions) == 12 and all(captions)
  np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0)) and np.testing.assert_allclose(sigma, np.cov(feats.T))
  # The same images read in-process give the same features (the data as training reads it).
  data = config_lib.load("configs/mmdit_256.py:test").data
  from jdiff.data import sources
  images, caps = next(fid.source_images(sources.make_source(data, "train"), data.resolution, 12, batch_size=12))
  assert list(caps) == list(captions)
  np.testing.assert_allclose(fid.Features.load(weights)(images), feats, rtol=1e-5, atol=1e-5 * np.abs(feats).max())

  out = helpers.cli("jdiff.evaluate", f"--workdir={tiny_run}", "--metrics=fid,kid", f"--fid_stats={stats}",
                    f"--fid_weights={weights}", "--num_samples=12", "--num_steps=2")
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(result) == {"fid", "kid", "kid_std", "n", "resize"} and result["n"] == 12
  assert result["fid"] > 0 and np.isfinite(result["kid"])


@pytest.mark.heavy
def test_fid_and_kid_in_the_training_loop(tmp_path):
  """config.eval.metrics=('fid', 'kid'): computed at each evaluation on the EMA weights and
  written to eval.jsonl, TensorBoard and the learning curve; a missing statistics file stops
  the run before it trains."""
  from safetensors.numpy import save_file

  import test_train
  from jdiff import errors
  from jdiff.eval import curves
  from jdiff.train import trainer

  weights, stats = str(tmp_path / "inception.safetensors"), str(tmp_path / "stats.npz")
  save_file(inception_io.export_state_dict(_random_params()), weights)
  reference = np.random.default_rng(0).standard_normal((6, inception.POOL_FEATURES)).astype(np.float32)
  fid.save_stats(stats, *fid.statistics(reference), features=reference, resize="tf1_bilinear",
                 captions=np.array(["a small red circle in the center", "a large blue square on the left"] * 3))
  over = dict(train__sample_every=0, train__num_steps=4, eval__every=2, eval__at_end=True,
              eval__metrics=("fid", "kid"), eval__fid_stats=stats, eval__fid_weights=weights, eval__fid_samples=4,
              eval__num_steps=2)
  missing = test_train.get_config(**dict(over, eval__fid_stats=str(tmp_path / "nope.npz")))
  with pytest.raises(errors.NotFound, match="no FID statistics at"):
    trainer.train_and_evaluate(missing, str(tmp_path / "missing"))
  assert not (tmp_path / "missing" / "config.json").exists()  # a failed start leaves the workdir as it was
  config = test_train.get_config(**over)
  summary = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  evals = curves.read_jsonl(str(tmp_path / "run" / "eval.jsonl"))
  assert [e["step"] for e in evals] == [2, 4]
  for e in evals:  # only the metrics asked for
    assert set(e) == {"step", "fid", "kid", "kid_std"} and e["fid"] > 0 and np.isfinite(e["kid"])
  assert summary["eval"]["fid"] == evals[-1]["fid"]
  assert sorted(curves.curve_data(str(tmp_path / "run"))["other"]) == ["fid", "kid", "kid_std"]
  # The finished run started again trains nothing and does not evaluate its last step twice.
  again = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert again["step"] == 4 and again["eval"] is None
  assert len((tmp_path / "run" / "eval.jsonl").read_text().splitlines()) == 2
