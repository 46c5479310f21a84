"""The stage objectives in the trainer (DPO against a frozen reference, guidance and
few-step distillation from a frozen teacher), the pipeline that chains the stages, and
their validation."""

import functools
import json
import math
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import config as config_lib
from jdiff import config_checks
from jdiff import diffusion
from jdiff.hf import workdirs
from jdiff.recipes import stage_pipeline
from jdiff import networks as networks_lib
from jdiff.data import pipeline as pipeline_lib
from jdiff.train import objectives
from jdiff.train import optim

import helpers
from test_train import get_config, restored


def _batch(config, size=4):
  p = pipeline_lib.make_pipeline(config.data, global_batch=size, max_len=config.text.max_len, seed=0)
  return {k: jnp.asarray(v) for k, v in next(p).items()}


def test_dpo_loss_and_gradient_at_the_reference():
  """Policy == reference: the loss is log 2 with zero margin, and its gradient is
  beta/2 * grad(mean(err_w - err_l)) (d/dm -log sigmoid(-beta m) = beta sigmoid(beta m))."""
  config = get_config(data__source="preference")
  config.stage, config.objective, config.dpo.beta = "posttrain", "dpo", 50.0
  networks = networks_lib.build_networks(config)
  params = helpers.perturb(nn.unbox(networks.init_params(jax.random.key(0))))
  batch = _batch(config)
  keys = jax.random.split(jax.random.key(3), 4)
  frozen = objectives.Frozen(networks)
  loss_fn = functools.partial(objectives.loss_fn, networks=networks, config=config, frozen=frozen)
  (loss, (per_sample, _, extra)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, batch, keys, params)
  # Policy and reference are separate computations in one jitted graph: equal up to rounding.
  np.testing.assert_allclose(per_sample, np.log(2.0), rtol=1e-5)
  np.testing.assert_allclose(extra["dpo_margin"], 0.0, atol=1e-6)
  assert float(jnp.abs(extra["err_w"] - extra["err_l"]).min()) > 0  # the two images differ

  def err_gap(p):
    extra = loss_fn(p, batch, keys, params)[1][2]
    return jnp.mean(extra["err_w"] - extra["err_l"])

  expected = jax.tree.map(lambda g: 0.5 * config.dpo.beta * g, jax.jit(jax.grad(err_gap))(params))
  chex.assert_trees_all_close(grads, expected, atol=1e-6, rtol=1e-4)


def test_solve_with_a_time_grid_per_sample():
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
  velocity = lambda x, t: -x * t.reshape(-1, 1, 1, 1) + 0.3
  grids = jnp.stack([diffusion.sampling_times(5, s) for s in (1.0, 2.0, 3.0)], axis=1)  # [6, 3]
  together = diffusion.solve(velocity, x, grids)
  for i in range(3):
    alone = diffusion.solve(velocity, x[i:i + 1], grids[:, i])
    np.testing.assert_allclose(together[i:i + 1], alone, rtol=1e-6, atol=1e-6)


def test_few_step_oracle_student_reproduces_the_teacher():
  """A student that outputs the few-step target exactly, sampled with K Euler steps on the
  coarse grid, lands where the teacher lands with K*M steps on the fine grid."""
  cfg = helpers.TINY_MMDIT
  x, _, cond = helpers.inputs(cfg, batch=2)
  model, params = helpers.init(cfg, x, jnp.zeros(2), cond)
  params = helpers.perturb(params)
  teacher = lambda x, t: model.apply(params, x, t, **cond)
  coarse, fine = diffusion.few_step_grid(4, 3, 64, dict(kind="fixed", shift=3.0))
  np.testing.assert_array_equal(fine[::3], coarse)

  def oracle(x_t, t):
    k = jnp.argmin(jnp.abs(coarse[:, None] - t[None]), axis=0)  # the interval this step starts
    _, target = diffusion.few_step_target(teacher, x_t, k, coarse, fine)
    return target

  noise = jax.random.normal(jax.random.key(7), x.shape)
  np.testing.assert_allclose(diffusion.solve(oracle, noise, coarse), diffusion.solve(teacher, noise, fine),
                             atol=1e-4)


def test_student_states_are_the_students_own_euler_steps_from_the_noise():
  """The on-policy start of interval k is where k of the student's Euler steps on the
  coarse grid take the noise: the noise itself at k = 0, and per sample."""
  velocity = lambda x, t: jnp.sin(x) * t.reshape(-1, 1, 1, 1) - 0.2 * x
  coarse = diffusion.inference_times(4, 64, dict(kind="fixed", shift=3.0))
  eps = jax.random.normal(jax.random.key(3), (4, 2, 2, 3))
  k = jnp.array([0, 1, 2, 3])
  states = diffusion.student_states(velocity, eps, k, coarse)
  for i in range(4):
    by_hand = eps[i:i + 1]
    for j in range(i):
      by_hand = by_hand + (coarse[j + 1] - coarse[j]) * velocity(by_hand, coarse[j:j + 1])
    np.testing.assert_allclose(states[i:i + 1], by_hand, rtol=1e-6, atol=1e-6)


def test_ode_state_reaches_each_samples_time_along_the_ode():
  """The guidance student's on-policy state: the ODE from the noise at t = 1 to each
  sample's own t in equal Euler steps; for dx/dt = -x it is eps (1 + (1 - t)/S)^S."""
  eps = jax.random.normal(jax.random.key(4), (3, 2, 2, 1))
  t = jnp.array([1.0, 0.5, 0.1])
  state = diffusion.ode_state(lambda x, t: -x, eps, t, 5)
  by_hand = eps * ((1 + (1 - t) / 5) ** 5).reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(state, by_hand, rtol=1e-5)
  np.testing.assert_array_equal(state[0], eps[0])  # no step at t = 1


def _pipeline(variant="test"):
  p = config_lib.load(os.path.join(helpers.ROOT, "configs", f"stages.py:{variant}"))
  p.base.mesh.data = 1
  return p


def _flat(params):
  return {optim.param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.heavy
def test_pipeline_runs_every_stage_with_its_objective_resumes_and_writes_the_table(tmp_path):
  """configs/stages.py:test end to end: pretrain on web data -> more of it at a higher
  resolution -> SFT on curated data -> DPO, and GRPO beside it from SFT -> LoRA -> the
  guidance student and the few-step student beside it,
  each from its parent's EMA weights, lineage recorded; a finished stage is skipped
  when the command runs again; the table prices each sampler in forwards. The first run is
  the command itself, `python -m jdiff.stages`."""
  p = _pipeline()
  out = helpers.cli("jdiff.stages", "--config=configs/stages.py:test", f"--workdir={tmp_path}",
                    f"--config.base.mesh.data={p.base.mesh.data}").stdout
  rows = json.load(open(tmp_path / "stages.json"))
  table = open(tmp_path / "stages.md").read()
  assert table.strip() in out  # the command prints the table it writes
  configs = {name: (d, c) for name, d, c in stage_pipeline.stage_configs(p, str(tmp_path))}
  states = {name: restored(d, c) for name, (d, c) in configs.items()}
  lineage = states["fewstep"][2]
  assert [e["stage"] for e in lineage] == ["pretrain", "pretrain", "posttrain", "posttrain", "tune", "distill"]
  # grpo branches from sft beside dpo; tune continues from grpo; both students from tune.
  assert [os.path.basename(e["workdir"]) for e in lineage] == [n for n in configs if n not in ("dpo", "guidance")]
  assert [os.path.basename(e["workdir"]) for e in states["guidance"][2]][-2:] == ["tune", "guidance"]
  assert [os.path.basename(e["workdir"]) for e in states["dpo"][2]] == ["pretrain", "hires", "sft", "dpo"]
  grpo_log = [json.loads(line) for line in open(os.path.join(configs["grpo"][0], "metrics.jsonl"))]
  assert all(0.0 <= m["reward"] <= 1.0 and m["kl"] >= 0.0 for m in grpo_log if "reward" in m)
  dpo = json.loads(open(os.path.join(configs["dpo"][0], "metrics.jsonl")).readlines()[-1])
  assert 0.0 <= dpo["dpo_accuracy"] <= 1.0 and dpo["err_w"] > 0 and np.isfinite(dpo["dpo_margin"])
  # dpo trained on on-policy pairs: the sft model's own wrong samples, sampled before it trained.
  pairs_dir = configs["dpo"][1].data.pairs_dir
  assert pairs_dir == os.path.join(configs["dpo"][0], "pairs")
  meta = json.load(open(os.path.join(pairs_dir, "meta.json")))
  assert meta["workdir"] == os.path.abspath(configs["sft"][0]) and meta["num_sampled"] == p.pairs.num
  assert meta["resolution"] == configs["dpo"][1].data.resolution and 0 < meta["num_pairs"] <= p.pairs.num
  with np.load(os.path.join(pairs_dir, "pairs.npz")) as z:
    assert z["wrong"].any(1).all() and len(z["index"]) == meta["num_pairs"]

  # tune: only the adapters moved; the base is the GRPO model, bit for bit.
  tuned, dpo_model = _flat(states["tune"][0].params), _flat(states["grpo"][0].averaged())
  lora = [k for k in tuned if "lora_" in k]
  assert lora and set(tuned) - set(lora) == set(dpo_model)
  for k, v in dpo_model.items():
    np.testing.assert_array_equal(tuned[k], v, err_msg=k)
  # Every B has left zero, except on the last block's text queries, whose outputs nothing
  # reads; adapters sit in the blocks only.
  still_zero = [k for k in lora if k.endswith("lora_b") and not np.abs(tuned[k]).max() > 0]
  assert still_zero == ["denoiser/last_block/ctx_qkv/q/lora_b"], still_zero
  assert not any("t_embed" in k or "adaLN" in k for k in lora)
  # The adapters export in diffusers/PEFT naming (B carries alpha/rank).
  exported = workdirs.export_lora_dir(configs["tune"][0], str(tmp_path / "lora_export"))
  from safetensors.numpy import load_file
  tensors = load_file(exported["file"])
  ema = _flat(states["tune"][0].averaged())
  assert len(tensors) == len([k for k in ema if "lora_" in k]) == exported["num_tensors"]
  scale = configs["tune"][1].lora.alpha / configs["tune"][1].lora.rank
  np.testing.assert_allclose(tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"],
                             scale * ema["denoiser/blocks_0/x_qkv/q/lora_b"].T, rtol=1e-6)
  # guidance: the student is the LoRA-merged tune model plus a guidance embedding.
  student = _flat(states["guidance"][0].params)
  assert set(student) - set(dpo_model) and all("guidance_embed" in k for k in set(student) - set(dpo_model))

  by_name = {r["name"]: r for r in rows}
  assert list(by_name) == ["pretrain", "hires", "sft", "dpo", "grpo", "tune", "tune @ 3 steps", "guidance", "fewstep"]
  assert [r["resolution"] for r in rows] == [16] + [24] * 8  # hires moved to 24x24
  assert by_name["tune @ 3 steps"]["forwards"] == 3 * 2  # CFG: two forwards per step
  assert by_name["guidance"]["forwards"] == p.base.eval.num_steps  # embedded guidance: one
  assert by_name["fewstep"]["forwards"] == 2 and by_name["fewstep"]["sampler"] == "2 x 1"
  assert table.count("\n| ") == len(rows) and os.path.exists(tmp_path / "stages.json")
  # The picture: a row of samples per table row, each image scaled to 64 px, plus the gaps.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  assert Image.open(tmp_path / stage_pipeline.PICTURE).height == len(rows) * (64 + 2) + 2
  assert all(0 <= r["adherence"][s]["clean"] <= 1 and r["adherence"][s]["residual"] >= 0 for r in rows
             for s in ("seen", "held_out", "new_color"))
  for r in rows:  # the per-image scores the effects are paired over add up to the tallies
    for s in ("seen", "held_out", "new_color"):
      a, per_image = r["adherence"][s], r["adherence"][s]["per_image"]
      assert len(per_image["verdicts"]) == a["n"] == len(per_image["residual"])
      assert np.mean([v == "1111" for v in per_image["verdicts"]]) == pytest.approx(a["all"])
      assert np.mean([v[0] == "1" for v in per_image["verdicts"]]) == pytest.approx(a["color"])
      assert np.mean(per_image["residual"]) == pytest.approx(a["residual"], abs=1e-4)
  # Each row's effect is measured from the stage it started from; the teacher row from its own stage.
  assert [r["parent"] for r in rows] == [None, "pretrain", "hires", "sft", "sft", "grpo", "tune", "tune", "tune"]

  # Running the command again: finished stages are skipped (an interrupted one resumes from
  # its checkpoint: the trainer's resume tests); a longer stage continues where it stopped.
  mtimes = {name: os.path.getmtime(os.path.join(d, "metrics.jsonl")) for name, (d, _) in configs.items()}
  mtimes["pairs"] = os.path.getmtime(os.path.join(pairs_dir, "pairs.npz"))
  assert all(stage_pipeline.finished(d, c.train.num_steps) for d, c in configs.values())
  p.stages.fewstep.train.num_steps = 3
  stage_pipeline.train_all(p, str(tmp_path))
  assert all(os.path.getmtime(os.path.join(d, "metrics.jsonl")) == mtimes[name]
             for name, (d, _) in configs.items() if name != "fewstep")
  assert os.path.getmtime(os.path.join(pairs_dir, "pairs.npz")) == mtimes["pairs"]  # sampled once
  assert json.loads(open(os.path.join(configs["fewstep"][0], "metrics.jsonl")).readlines()[-1])["step"] == 3


def test_stage_effects_carry_binomial_standard_errors():
  def row(name, parent, seen_all, colour):
    split = dict(color=1.0, shape=1.0, size=1.0, position=1.0, all=seen_all, n=100, clean=seen_all / 2,
                 residual=3.25, residual_se=0.5)
    return dict(name=name, parent=parent, objective="flow", train_steps=1, resolution=8, sampler="2 x 2",
                forwards=4, adherence=dict(seen=split, held_out=split, new_color=dict(split, color=colour)))
  rows = [row("a", None, 0.7, 0.5), row("b", "a", 0.8, 0.9)]
  assert stage_pipeline.standard_error(0.7, 100) == pytest.approx(math.sqrt(0.21 / 100))
  d, se = stage_pipeline.effect(rows[1], rows[0], "seen")
  assert d == pytest.approx(0.1) and se == pytest.approx(math.sqrt(0.0021 + 0.0016))
  d, se = stage_pipeline.effect(rows[1], rows[0], "new_color", "color")
  assert d == pytest.approx(0.4) and se == pytest.approx(math.sqrt(0.0025 + 0.0009))
  table = stage_pipeline.markdown(rows).splitlines()
  assert "| 0.800 ± 0.040 | +0.100 ± 0.061 |" in table[3] and "| 0.900 ± 0.030 | +0.400 ± 0.058 |" in table[3]
  assert "| 0.700 ± 0.046 |  |" in table[2]  # the first stage has no effect
  assert table[3].endswith("| 0.400 ± 0.049 | 3.25 ± 0.50 |")  # render quality of the seen images
  assert "Quality drops" not in "\n".join(table)


def test_stage_effects_are_paired_over_the_same_prompts():
  """With per-image scores the effect's error is that of the per-prompt differences, by hand:
  a stage that fixes one of four prompts and changes nothing else has differences (0, 1, 0, 0),
  mean 1/4, sample standard deviation 1/2, error 1/4; the quadrature bound of the same
  tallies would be sqrt(2 x 3/16 / 4) = 0.31."""
  def row(name, parent, verdicts, residuals):
    right = [v.count("1") == 4 for v in verdicts]
    split = dict(color=1.0, shape=1.0, size=1.0, position=1.0, all=sum(right) / len(right), n=len(right),
                 clean=0.5, residual=sum(residuals) / len(residuals), residual_se=0.01,
                 per_image=dict(verdicts=verdicts, residual=residuals))
    return dict(name=name, parent=parent, objective="dpo", train_steps=1, resolution=8, sampler="2 x 2",
                forwards=4, adherence=dict(seen=split, held_out=split, new_color=split))
  a = row("sft", None, ["1111", "0111", "1011", "1111"], [1.0, 2.0, 3.0, 4.0])
  b = row("dpo", "sft", ["1111", "1111", "1011", "1111"], [2.0, 3.0, 4.0, 5.5])
  d, se = stage_pipeline.effect(b, a, "seen")
  assert d == pytest.approx(0.25) and se == pytest.approx(0.25)
  d, se = stage_pipeline.effect(b, a, "seen", "color")  # the first attribute: (0, 1, 0, 0) again
  assert d == pytest.approx(0.25) and se == pytest.approx(0.25)
  d, se = stage_pipeline.effect(b, a, "seen", "shape")  # right on every image of both
  assert d == 0.0 and se == 0.0
  assert stage_pipeline.paired_difference([1, 2], [1, 2]) == (0.0, 0.0)
  # Residuals up by (1, 1, 1, 1.5): mean 1.125, error 0.125 (sd 0.25 / 2): a drop far beyond
  # two errors, which the residual_se of 0.01 each would also show, but paired it is exact.
  drops = stage_pipeline.quality_drops([a, b])
  assert drops == ["- dpo: reward hacking: seen all +0.250, held-out all +0.250 while artefacts rose "
                   "2.50 -> 3.62 (+1.12 ± 0.12) from sft"]
  table = stage_pipeline.markdown([a, b]).splitlines()
  assert "| 1.000 ± 0.000 | +0.250 ± 0.250 |" in table[3]


def _seed_rows(seen, residual):
  """Two rows (sft, then dpo from it) of one seed: seen 'all' and artefacts per row."""
  def row(name, parent, all_, res):
    split = dict(color=0.5, shape=1.0, size=1.0, position=1.0, all=all_, n=100, clean=0.5, residual=res,
                 residual_se=0.1)
    return dict(name=name, parent=parent, objective="flow", train_steps=1, resolution=8, sampler="2 x 2",
                forwards=4, adherence=dict(seen=split, held_out=dict(split, all=all_ / 2), new_color=split))
  return [row("sft", None, seen[0], residual[0]), row("dpo", "sft", seen[1], residual[1])]


def test_table_over_seeds_is_the_mean_with_its_standard_error():
  """By hand: seen 'all' of dpo over three seeds 0.7, 0.8, 0.9: mean 0.8, sample standard
  deviation 0.1, error 0.1 / sqrt(3) = 0.058; its effects from sft (0.6, 0.6, 0.9): +0.1,
  +0.2, +0.0: mean +0.1, error 0.058; artefacts 3, 4, 5 after 3, 3, 3: effect +1.0 ± 0.577."""
  tables = {0: _seed_rows((0.6, 0.7), (3.0, 3.0)), 1: _seed_rows((0.6, 0.8), (3.0, 4.0)),
            2: _seed_rows((0.9, 0.9), (3.0, 5.0))}
  lines = stage_pipeline.across_seeds(tables).splitlines()
  assert lines[2] == "| sft | 2 x 2 | 0.700 ± 0.100 |  | 0.350 ± 0.050 |  | 0.500 ± 0.000 |  | 3.000 ± 0.000 |  |"
  assert lines[3] == ("| dpo | 2 x 2 | 0.800 ± 0.058 | +0.100 ± 0.058 | 0.400 ± 0.029 | +0.050 ± 0.029 "
                      "| 0.500 ± 0.000 | +0.000 ± 0.000 | 4.000 ± 0.577 | +1.000 ± 0.577 |")
  assert "Seeds 0, 1, 2, 100 prompts per split each" in lines[5]
  with pytest.raises(ValueError, match="seed 1 has rows"):
    stage_pipeline.across_seeds({0: tables[0], 1: tables[1][:1]})


def test_run_seeds_runs_the_pipeline_once_per_seed_in_its_own_directory(tmp_path, monkeypatch):
  runs = []

  def run(pipeline, workdir):
    runs.append((pipeline.base.seed, workdir))
    return _seed_rows((0.5, 0.5 + pipeline.base.seed / 10), (3.0, 3.0)), ""

  monkeypatch.setattr(stage_pipeline, "run", run)
  p = _pipeline()
  tables, table = stage_pipeline.run_seeds(p, str(tmp_path), [3, 1])
  assert runs == [(3, str(tmp_path / "seed_3")), (1, str(tmp_path / "seed_1"))]
  assert p.base.seed == 0  # the caller's config is left as it was
  assert open(tmp_path / "stages.md").read() == table and "| dpo | 2 x 2 | 0.700 ± 0.100 |" in table
  assert list(json.load(open(tmp_path / "stages.json"))) == ["3", "1"]
  with pytest.raises(ValueError, match="distinct seeds"):
    stage_pipeline.run_seeds(p, str(tmp_path), [1, 1])


def test_table_names_reward_hacking_and_quality_drops():
  """A row whose artefacts rose by more than twice the difference's standard error is named
  under the table: as reward hacking where a preference or RL stage also raised "all four",
  else as a quality drop; a rise within that bound is not."""
  def row(name, parent, objective, seen_all, residual):
    split = dict(color=1.0, shape=1.0, size=1.0, position=1.0, all=seen_all, n=100, clean=0.5,
                 residual=residual, residual_se=0.3)
    return dict(name=name, parent=parent, objective=objective, train_steps=1, resolution=8, sampler="2 x 2",
                forwards=4, adherence=dict(seen=split, held_out=dict(split, all=0.5), new_color=split))
  rows = [row("sft", None, "flow", 0.6, 3.0), row("dpo", "sft", "dpo", 0.7, 4.0),  # +1.0 > 2 x 0.42
          row("grpo", "sft", "grpo", 0.7, 3.8),  # +0.8 < 2 x 0.42
          row("tune", "dpo", "flow", 0.8, 5.0), row("fewstep", "tune", "fewstep", 0.6, 6.0)]
  drops = stage_pipeline.quality_drops(rows)
  assert drops == [
      "- dpo: reward hacking: seen all +0.100 while artefacts rose 3.00 -> 4.00 (+1.00 ± 0.42) from sft",
      "- tune: quality drop: artefacts rose 4.00 -> 5.00 (+1.00 ± 0.42) from dpo",
      "- fewstep: quality drop: artefacts rose 5.00 -> 6.00 (+1.00 ± 0.42) from tune"]
  assert stage_pipeline.markdown(rows).split("\n\n")[1].splitlines()[1:] == drops


@pytest.mark.parametrize("changes,message", [
    (dict(objective="dpo"), "not one of ('flow',)"),
    (dict(stage="posttrain", objective="dpo", init_from="x"), "data.source='preference'"),
    (dict(stage="distill", objective="guidance", init_from="x"), "guidance_embed=True"),
    (dict(stage="distill", objective="flow"), "not one of ('guidance', 'fewstep')"),
])
def test_stage_objective_validation(changes, message):
  config = get_config()
  for k, v in changes.items():
    config[k] = v
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_checks.validate(config)


@pytest.mark.parametrize("split", ["held_out", "prompts"])
def test_captions_only_splits_are_for_objectives_that_read_no_image(split):
  """The splits with the benchmark's unseen pairs feed grpo's prompts and on-policy
  distillation (which starts from noise); training on their images is refused."""
  config = get_config(data__shapes_split=split, stage="distill", objective="fewstep", init_from="x")
  config.model.guidance_embed = True
  config.distill.states = "data"  # trains at noised images of the split
  with pytest.raises(ValueError, match="never images"):
    config_checks.validate(config)
  config.distill.states = "student"
  config_checks.validate(config)
  config.objective = "guidance"
  config_checks.validate(config)
  with pytest.raises(ValueError, match="never images"):
    config_checks.validate(get_config(data__shapes_split=split))  # flow


@pytest.mark.parametrize("name", ["dpo", "guidance", "fewstep"])
def test_objectives_with_a_frozen_model_need_init_from(name):
  config = get_config()
  config.objective = name
  with pytest.raises(ValueError, match="set config.init_from"):
    objectives.check(config)
  config.init_from = "parent"
  assert objectives.check(config) is objectives.OBJECTIVES[name] and objectives.OBJECTIVES[name].frozen
  config.objective = "flow"
  config.init_from = ""
  assert not objectives.check(config).frozen


@pytest.mark.parametrize("edit,message", [
    (lambda p: p.update(order="pretrain,sft,nope"), "does not define"),
    (lambda p: p.stages.sft.update(optim=dict(no_such_field=1)), "no such config field"),
    (lambda p: p.pairs.update(stages="dpo,nope"), "which config.order does not run"),
    (lambda p: p.pairs.update(stages="pretrain"), "no parent model"),
    (lambda p: p.pairs.update(stages="sft"), "data.pairs_dir is set but data.source is 'shapes'"),
    (lambda p: p.stages.dpo.update(init_from="tune"), "names no stage that config.order runs before it"),
])
def test_pipeline_config_errors_name_the_problem(edit, message, tmp_path):
  p = _pipeline()
  with p.unlocked():  # as if the pipeline file itself said so (the --config flag locks it after)
    edit(p)
  with pytest.raises(ValueError, match=message):
    stage_pipeline.stage_configs(p, str(tmp_path))


def test_noised_is_the_shared_opening_of_the_objectives():
  """objectives.noised: x_t = (1 - t) x0 + t eps; the same keys draw the same t and eps
  whichever image is noised (DPO's pair shares them); caption_dropout 1 and 0 replace every
  caption by the empty one and none."""
  config = get_config()
  networks = networks_lib.build_networks(config)
  rng = np.random.default_rng(0)
  res = config.data.resolution
  batch = dict(image_w=rng.integers(0, 256, (6, res, res, 3), np.uint8),
               image_l=rng.integers(0, 256, (6, res, res, 3), np.uint8),
               tokens=rng.integers(2, 100, (6, config.text.max_len)).astype(np.int32))
  keys = jax.random.split(jax.random.key(3), 6)
  w = objectives.noised(batch, keys, networks, config, image="image_w", caption_dropout=0.0)
  l = objectives.noised(batch, keys, networks, config, image="image_l", caption_dropout=1.0)
  np.testing.assert_array_equal(w.t, l.t)
  np.testing.assert_array_equal(w.eps, l.eps)
  np.testing.assert_allclose(w.x0, batch["image_w"] / 127.5 - 1.0, atol=1e-6)
  t = np.asarray(w.t)[:, None, None, None]
  np.testing.assert_allclose(w.x_t, (1 - t) * np.asarray(w.x0) + t * np.asarray(w.eps), atol=1e-6)
  np.testing.assert_array_equal(w.inputs["tokens"], batch["tokens"])
  np.testing.assert_array_equal(l.inputs["tokens"], np.broadcast_to(networks.null_tokens(), batch["tokens"].shape))
