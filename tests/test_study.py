"""Validation loss, learning curves and training studies: their numbers and their files."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from jdiff import config as config_lib
from jdiff import networks as networks_lib
from jdiff.recipes import studies
from jdiff import tokens
from jdiff.data import shapes
from jdiff.eval import curves
from jdiff.eval import validation
from jdiff.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(**overrides):
  config = config_lib.load(os.path.join(ROOT, "configs", "mmdit_256.py:test"))
  config.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
  return config


def test_validation_loss_is_the_velocity_error_at_fixed_times_and_noise():
  config = get_config(eval__val_examples=5, eval__val_times=3)
  networks = networks_lib.build_networks(config)
  # Nonzero output layers (they start at zero), so the prediction depends on the input.
  params = jax.tree.map(lambda p: p + 0.02, nn.unbox(networks.init_params(jax.random.key(0))))
  out = validation.loss(networks, params, config, batch_size=2)  # 5 examples: a padded last batch
  other = validation.loss(networks, params, config, batch_size=4)  # fixed draws, any batching
  assert other.keys() == out.keys()
  np.testing.assert_allclose([other[k] for k in out], list(out.values()), rtol=1e-5)
  np.testing.assert_allclose(validation.times(3), [1 / 6, 1 / 2, 5 / 6], rtol=1e-6)

  # By hand: the images of the held-apart seed, the noise of key fold_in(fold_in(seed, i), j).
  src = shapes.ShapesSource(config.data.resolution, "train", size=5,
                            seed=config.data.shapes_seed + validation.SEED_OFFSET)
  records = [src[j] for j in range(5)]
  x0 = jnp.asarray(np.stack([r["image"] for r in records]), jnp.float32) / 127.5 - 1.0  # by hand
  toks = jnp.asarray(tokens.tokenize([r["caption"] for r in records], config.text.max_len))
  per_t = []
  for i, t in enumerate(validation.times(3)):
    keys = [jax.random.fold_in(jax.random.fold_in(jax.random.key(config.eval.seed), i), j) for j in range(5)]
    eps = jnp.stack([jax.random.normal(k, x0.shape[1:]) for k in keys])
    tt = jnp.full((5,), t)
    x_t = (1 - t) * x0 + t * eps
    v = networks.predict(params["denoiser"], x_t, tt, networks.conditioning(params, {"tokens": toks}))
    per_t.append(float(jnp.mean((v - (eps - x0)) ** 2)))
  np.testing.assert_allclose([out[f"val_loss/t={t:.2f}"] for t in validation.times(3)], per_t, rtol=1e-5)
  np.testing.assert_allclose(out["val_loss"], np.mean(per_t), rtol=1e-5)
  # A guidance-embedding student made from this model (its embedding starts at zero) is
  # scored at w = 1: the same loss as its teacher.
  student_config = get_config(eval__val_examples=5, eval__val_times=3, model__guidance_embed=True)
  student_networks = networks_lib.build_networks(student_config)
  student = nn.unbox(student_networks.init_params(jax.random.key(1)))
  student["text"] = params["text"]
  student["denoiser"] = dict(params["denoiser"], guidance_embed=student["denoiser"]["guidance_embed"])
  np.testing.assert_allclose(validation.loss(student_networks, student, student_config, batch_size=2)["val_loss"],
                             out["val_loss"], rtol=1e-6)
  # Not a training image: the held-apart seed draws other scenes.
  train = shapes.ShapesSource(config.data.resolution, "train", size=5, seed=config.data.shapes_seed)
  assert [train[j]["caption"] for j in range(5)] != [r["caption"] for r in records]


def test_trainer_writes_learning_curve_and_validation_loss(tmp_path):
  config = get_config(eval__every=2, eval__at_end=True, eval__val_examples=4, eval__val_times=2,
                      train__sample_every=0, train__num_steps=4)
  config.mesh.data = 1
  summary = trainer.train_and_evaluate(config, str(tmp_path))
  evals = curves.read_jsonl(str(tmp_path / "eval.jsonl"))
  assert [e["step"] for e in evals] == [2, 4]
  for e in evals:
    assert set(e) >= {"seen", "held_out", "new_color", "val_loss", "val_loss/t=0.25", "val_loss/t=0.75"}
    np.testing.assert_allclose(e["val_loss"], (e["val_loss/t=0.25"] + e["val_loss/t=0.75"]) / 2, rtol=1e-6)
  assert summary["eval"]["val_loss"] == evals[-1]["val_loss"]
  # The curve's data: training loss at every log step, validation and adherence at each evaluation.
  data = curves.curve_data(str(tmp_path))
  np.testing.assert_array_equal(data["train"][0], [2, 4])
  np.testing.assert_array_equal(data["val"][0], [2, 4])
  np.testing.assert_allclose(data["val"][1], [e["val_loss"] for e in evals])
  np.testing.assert_allclose(data["adherence"]["held_out"]["shape"][1], [e["held_out"]["shape"] for e in evals])
  metrics = [m for m in curves.read_jsonl(str(tmp_path / "metrics.jsonl")) if "loss" in m]
  np.testing.assert_allclose(data["lr"][1], [m["lr"] for m in metrics])
  np.testing.assert_allclose(data["grad_norm"][1], [m["grad_norm"] for m in metrics])
  bins = sorted({k for m in metrics for k in m if k.startswith("loss_t")})  # a bin no t fell in is not logged
  assert list(data["t_bins"]) == bins and len(bins) >= 2
  for k in bins:
    np.testing.assert_allclose(data["t_bins"][k][1], [m[k] for m in metrics if k in m])
  # Adherence and validation loss have panels of their own; the benchmark images' render quality
  # joins the other metrics.
  assert list(data["other"]) == ["clean (seen)"]
  np.testing.assert_array_equal(data["other"]["clean (seen)"][0], [e["step"] for e in evals])
  assert [e["seen"]["clean"] for e in evals] == list(data["other"]["clean (seen)"][1])
  # The PNG opens, at the figure's size, with a line per series in its panel.
  assert Image.open(tmp_path / curves.FILENAME).size == (1500, 800)
  fig = curves.draw(data)
  labels = [[line.get_label() for line in ax.get_lines()] for ax in fig.axes]
  assert labels[0] == ["training loss", "validation loss"]
  assert labels[1] == [f"t >= {k[len('loss_t'):]}" for k in bins] and len(labels[2]) == len(labels[5]) == 1
  assert len(labels[3]) == 2 * len(curves.CURVES)
  tb = [f for f in os.listdir(tmp_path / "tb") if f.startswith("events")]
  assert tb


def test_curves_draw_other_eval_metrics_and_are_written_at_the_end_without_evaluation(tmp_path):
  (tmp_path / "eval.jsonl").write_text('{"step": 2, "fid": 40.0, "kid": 0.03, "val_loss": 0.5}\n'
                                       '{"step": 4, "fid": 30.0, "kid": 0.02}\n')
  data = curves.curve_data(str(tmp_path))
  assert sorted(data["other"]) == ["fid", "kid"]
  np.testing.assert_allclose(data["other"]["fid"][1], [40.0, 30.0])
  fig = curves.draw(data)
  assert [line.get_label() for line in fig.axes[4].get_lines()] == ["fid", "kid"]
  config = get_config(train__sample_every=0, train__num_steps=2)
  config.mesh.data = 1
  config.eval.every, config.eval.at_end = 0, False
  trainer.train_and_evaluate(config, str(tmp_path / "run"))
  data = curves.curve_data(str(tmp_path / "run"))
  assert (tmp_path / "run" / curves.FILENAME).exists() and len(data["train"][0]) and not len(data["val"][0])
  # The command redraws it from the files alone, and names a missing workdir.
  out = subprocess.run([sys.executable, "-m", "jdiff.curves", f"--workdir={tmp_path / 'run'}",
                        f"--out={tmp_path / 'again.png'}"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0 and out.stdout.strip() == str(tmp_path / "again.png"), out.stderr
  assert Image.open(tmp_path / "again.png").size == Image.open(tmp_path / "run" / curves.FILENAME).size
  out = subprocess.run([sys.executable, "-m", "jdiff.curves", f"--workdir={tmp_path / 'nope'}"], cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode == 2 and "no workdir" in out.stderr.strip().splitlines()[-1], out.stderr


def test_read_jsonl_merges_records_by_step_and_skips_a_torn_line(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 2, "loss": 1.0}\n{"step": 2, "adherence/seen/all": 0.5}\n'
                  '{"step": 4, "loss": 0.8}\n{"step": 4, "loss": 0.7}\n{"step": 6, "lo')
  assert curves.read_jsonl(str(path)) == [{"step": 2, "loss": 1.0, "adherence/seen/all": 0.5},
                                          {"step": 4, "loss": 0.7}]


def _row(variant, seed, val, seen5, held5, seen25, held25):
  adh = lambda s, h: {"seen": {"all": s}, "held_out": {"all": h}}
  return dict(variant=variant, seed=seed, val_loss=val, num_steps=10, train_flops=1e12,
              adherence={"5 steps": adh(seen5, held5), "25 steps": adh(seen25, held25)})


def test_study_summary_means_spreads_and_ranks():
  rows = [_row("uniform", 0, 0.30, 0.2, 0.1, 0.4, 0.3), _row("uniform", 1, 0.34, 0.4, 0.1, 0.6, 0.3),
          _row("cosmap", 0, 0.20, 0.5, 0.2, 0.5, 0.3), _row("cosmap", 1, 0.22, 0.7, 0.4, 0.5, 0.3)]
  table = studies.summarize("timesteps", rows)
  assert [e["variant"] for e in table] == ["uniform", "cosmap"]  # the study's order, finished only
  u, c = table
  assert u["metrics"]["val_loss"]["mean"] == pytest.approx(0.32)
  assert u["metrics"]["val_loss"]["std"] == pytest.approx(np.std([0.30, 0.34], ddof=1))
  assert c["metrics"]["seen all, 5 steps"]["mean"] == pytest.approx(0.6)
  # Ranks: lower loss and higher adherence are better; ties share the average rank.
  assert (u["metrics"]["val_loss"]["rank"], c["metrics"]["val_loss"]["rank"]) == (2, 1)
  assert (u["metrics"]["held_out all, 25 steps"]["rank"], c["metrics"]["held_out all, 25 steps"]["rank"]) == (1.5, 1.5)
  assert c["average_rank"] == pytest.approx(np.mean([1, 1, 1, 1.5, 1.5]))
  md = studies.markdown("timesteps", table)
  assert "| uniform | 2 | 10 |" in md and "0.3200 ± 0.0283 (2)" in md


def test_study_configs_and_equal_compute():
  base = get_config()
  arch = studies.STUDIES["arch"]
  mmdit = studies.variant_config(base, arch, "MMDiT", 1)
  dit = studies.variant_config(base, arch, "DiT", 1)
  assert (mmdit.seed, dit.model.name, mmdit.eval.at_end) == (1, "dit", False)
  d_mmdit, d_dit = (networks_lib.build_networks(c).denoiser for c in (mmdit, dit))
  assert (d_dit.width, d_dit.depth, d_dit.num_heads) == (d_mmdit.width, d_mmdit.depth, d_mmdit.num_heads)
  # DiT's cheaper step gets more steps, to the same training FLOPs (up to one step's rounding).
  assert dit.train.num_steps > mmdit.train.num_steps
  assert abs(studies.train_flops(dit) - studies.train_flops(mmdit)) <= studies.train_flops(dit) / dit.train.num_steps
  shift = studies.variant_config(base, studies.STUDIES["shift"], "train no shift", 0)
  assert (shift.data.resolution, shift.diffusion.shift.kind) == (2 * base.data.resolution, "none")
  ts = studies.variant_config(base, studies.STUDIES["timesteps"], "lognorm(0.50, 0.60)", 0)
  assert (ts.diffusion.timesteps.kind, ts.diffusion.timesteps.mean, ts.diffusion.timesteps.std) == ("logit_normal", 0.5, 0.6)


@pytest.mark.heavy
def test_study_runs_resumes_and_writes_its_table(tmp_path, monkeypatch):
  """A two-variant study of tiny runs: every run scored, the table written, and a second
  call trains nothing (it reads the finished runs' results)."""
  tiny = studies.Study("tiny", (("uniform", {"diffusion.timesteps.kind": "uniform"}),
                              ("cosmap", {"diffusion.timesteps.kind": "cosmap"})),
                     sampling=(studies.Sampling("2 steps", 2),))
  monkeypatch.setitem(studies.STUDIES, "tiny", tiny)
  base = get_config(train__num_steps=2, train__sample_every=0, eval__num_samples=2, eval__val_examples=2,
                    eval__val_times=2)
  base.mesh.data = 1
  out = studies.run("tiny", base, str(tmp_path), seeds=1)
  assert [r["variant"] for r in out["runs"]] == ["uniform", "cosmap"]
  for r in out["runs"]:
    assert set(r["adherence"]["2 steps"]) == {"seen", "held_out", "new_color"}
    assert r["val_loss"] > 0 and r["num_steps"] == 2
  on_disk = json.loads((tmp_path / "study.json").read_text())
  assert on_disk["summary"] == out["summary"]
  assert "| cosmap | 1 | 2 |" in (tmp_path / "study.md").read_text()
  monkeypatch.setattr(studies.trainer, "train_and_evaluate", lambda *a: pytest.fail("trained again"))
  assert studies.run("tiny", base, str(tmp_path), seeds=1)["summary"] == out["summary"]


def test_library_modules_define_no_flags_and_commands_check_theirs(tmp_path):
  """Flags belong to the commands (jdiff/<command>.py): every other module imports in one
  process without defining a flag, so tests and notebooks import any of them together; a
  command checks its required flags before any work."""
  code = ("import importlib, importlib.util, pkgutil, jdiff; from absl import flags\n"
          "names = [m.name for m in pkgutil.walk_packages(jdiff.__path__, 'jdiff.')]\n"
          "names = [n for n in names if 'if __name__ == \"__main__\":' not in "
          "open(importlib.util.find_spec(n).origin).read()]  # not the commands\n"
          "[importlib.import_module(n) for n in names]\n"
          "ours = [f for f, m in flags.FLAGS.flags_by_module_dict().items() if m and 'jdiff' in f]\n"
          "assert not ours, ours; print(len(names))")
  out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
  assert int(out.stdout) > 60
  out = subprocess.run([sys.executable, "-m", "jdiff.study", f"--workdir={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode == 2 and "--study" in out.stderr and not os.listdir(tmp_path), out.stderr

