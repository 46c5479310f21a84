"""The web and curated splits of the embedded shapes (jdiff/data/degrade.py), and render
quality (jdiff/eval/render_quality.py), which must tell their images apart."""

import math

import numpy as np
import pytest

from jdiff import config as config_lib
from jdiff import config_checks
from jdiff import errors
from jdiff.data import degrade, shapes, sources
from jdiff.eval import render_quality

RES = 24


def _residuals(rates, num=60, resolution=RES):
  return np.array([render_quality.residual(shapes.web_example(0, i, resolution, rates)[0]) for i in range(num)])


def test_clean_renders_score_clean_and_every_degradation_scores_worse():
  """The score ranks clean renders above each kind of degradation: by its mean distance to a
  clean render and by the fraction of images counted clean."""
  clean = np.array([render_quality.residual(shapes.render(shapes.scene_for(0, "train", i)[0], RES))
                    for i in range(200)])
  assert clean.max() <= render_quality.CLEAN and clean.mean() < 0.5
  no_rates = _residuals({}, num=200)
  np.testing.assert_array_equal(no_rates <= render_quality.CLEAN, True)  # 'web' at rate 0 is clean
  for name in degrade.DEGRADATIONS:
    r = _residuals({name: 1.0})
    # Each kind moves the mean by several standard errors, and fewer images count as clean.
    assert r.mean() - clean.mean() > 4 * r.std() / math.sqrt(len(r)), name
    assert (r <= render_quality.CLEAN).mean() <= 0.8, name
  # The score of a whole set: the fraction clean, the mean and its standard error.
  s = render_quality.score([shapes.web_example(0, i, RES, {"noise": 1.0})[0] for i in range(20)]
                           + [shapes.render(shapes.scene_for(0, "train", i)[0], RES) for i in range(20)])
  assert s["clean"] == 0.5 and s["n"] == 40 and s["residual_se"] > 0


def test_web_split_realises_its_rates_and_faults_do_what_they_say():
  rates = dict(noise=0.3, blur=0.2, jpeg=0.25, cast=0.1, clutter=0.15, occlusion=0.05, crop=0.4, wrong=0.2,
               missing=0.3)
  n = 1500
  examples = [shapes.web_example(3, i, 16, rates) for i in range(n)]
  for name, rate in rates.items():
    realised = np.mean([name in (e[2] if name in degrade.DEGRADATIONS else e[1].faults) for e in examples])
    assert abs(realised - rate) < 4 * math.sqrt(rate * (1 - rate) / n), (name, realised)
  for image, noisy, applied, scene in examples[:300]:
    truth = scene.attributes()
    assert (scene.color, scene.shape) not in shapes.HELD_OUT
    named = noisy.named
    assert len([a for a in named if named[a] != truth[a]]) == ("wrong" in noisy.faults)
    assert (len(named) < 4) == ("missing" in noisy.faults)
    for a, value in named.items():  # what the caption names is in its words
      word = shapes._PHRASES[value] if a == "position" else value  # pylint: disable=protected-access
      assert word in noisy.text, (noisy.text, a, value)
    assert ",," not in noisy.text.replace(" ", "") and noisy.text[0] != ",", noisy.text  # left-out fields leave no commas
    if not applied:
      np.testing.assert_array_equal(image, shapes.render(scene, 16))
  # The templates vary: short tags and long sentences.
  lengths = [len(e[1].text.split()) for e in examples]
  assert min(lengths) <= 4 and max(lengths) >= 14
  # A record is the same on every read (and from the source the config builds).
  c = config_lib.load("configs/mmdit_256.py:test")
  with c.unlocked():
    c.data.shapes_split, c.data.resolution, c.data.shapes_seed = "web", 16, 3
    c.data.web.update(rates)
  record = sources.make_source(c.data)[7]
  np.testing.assert_array_equal(record["image"], examples[7][0])
  assert record["caption"] == examples[7][1].text and record["color"] == examples[7][3].color


def test_curated_split_is_clean_with_every_attribute_named():
  for i in range(100):
    scene, text = shapes.scene_for(0, "curated", i)
    assert text == shapes.caption(scene, shapes.CURATED_TEMPLATE) and scene.background in text
    assert shapes.parse_caption(text) == scene.attributes()
    assert (scene.color, scene.shape) not in shapes.HELD_OUT
    assert render_quality.residual(shapes.render(scene, RES)) <= render_quality.CLEAN
  # Its scenes are its own, not the train split's.
  assert shapes.scene_for(0, "curated", 0)[0] != shapes.scene_for(0, "train", 0)[0]


@pytest.mark.parametrize("change,message", [
    (dict(noise=1.5), "config.data.web.noise=1.5: a rate in [0, 1]"),
    (dict(grain=0.1), "config.data.web: expected the rates"),
])
def test_web_rates_are_checked(change, message):
  c = config_lib.load("configs/mmdit_256.py:test")
  with c.unlocked():
    c.data.web.update(change)
  with pytest.raises(errors.InvalidArgument, match=message.replace("[", r"\[").replace(".", r"\.")):
    config_checks.validate(c)
  assert degrade.RATES == config_lib.WEB_RATES and shapes.SPLITS == config_lib.SHAPES_SPLITS
