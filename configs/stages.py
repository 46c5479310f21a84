"""The whole training pipeline on the embedded shapes data (`python -m jdiff.stages`):

  pretrain  flow matching from scratch (configs/mmdit_256.py) on the 'web' split: many
            records, images degraded and captions garbled at the rates of data.web
  hires     pretrain continued at the final resolution (progressive resolution, as in
            SD3), positions interpolated, on 'web' filtered to images that show their shape
            whole: the model relearns its shapes at the new token scale on plentiful data,
            so fine-tuning on the small curated split need not
  sft       posttrain: supervised fine-tuning on the small 'curated' split (clean renders,
            exact captions): the quality stage
  dpo       posttrain: Diffusion-DPO against the frozen sft model on on-policy pairs: the
            sft model samples held-out captions 4 times each, and a sample the adherence
            analyser finds wrong is rejected against a right one of the same caption
  grpo      posttrain: online RL (Flow-GRPO) from the sft model, beside dpo: groups of SDE
            samples per held-out caption, rewarded by the analyser; tune continues from it
  tune      LoRA (rank 8, attention and MLP projections of every block) teaching a colour
            word never seen before ('pink', data split new_color); the base stays frozen
  fewstep   distill: the tuned model with its CFG into a 4-step student of one forward a
            step (a tenth of the teacher's 20 x 2), trained on its own sampling states
  guidance  distill (defined, not in the cpu/gpu order): a student with the guidance scale
            as an input, one forward per step instead of CFG's two

Each stage starts from the previous one's EMA weights (jdiff/recipes/stage_pipeline.py), or
the one its init_from names. CPU demo (2 cores, BENCHMARKS.md has its time and table):
  python -m jdiff.stages --config=configs/stages.py:cpu --workdir=runs/stages
Seconds-long variant for the tests: configs/stages.py:test.

GPU/TPU (configs/stages.py:gpu, the default) is the same recipe at production scale, on
configs/mmdit_256.py's d12 model with patch 8: pretrain 400k steps at 256x256 on 'web' (the
compute-heavy stage), hires 40k steps at 512x512 (1024 image tokens instead of 256; the time
shift follows the token count), then every later stage 4000 steps at 512 with lr 1e-5 and
EMA 0.999: sft on 100k curated records, dpo on 16384 on-policy pairs, grpo with 32 prompts a
step, the LoRA tune, and the 4-step student. jdiff.stages runs on one host, every device
in its mesh (`python -m jdiff.stages --config=configs/stages.py --workdir=DIR`); across
several hosts, run each stage's `python -m jdiff.main` with the same fields (launch/).
"""

import os

import ml_collections

from jdiff import config as config_lib

VARIANTS = ("gpu", "cpu", "test")


def _base(variant: str) -> ml_collections.ConfigDict:
  return config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"mmdit_256.py:{variant}"))


def get_config(arg: str | None = None):
  variant = arg or "gpu"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/stages.py; expected one of {VARIANTS}")
  base = _base(variant)
  # Training steps of pretrain, then of each later stage; the resolution after sft.
  # cpu: three times the demo's 8000 steps: on the degraded web split the small model learns
  # shape that much later than on clean data (docs/notes.md, "Which degradation takes shape").
  pretrain_steps, stage_steps = dict(gpu=(400_000, 4000), cpu=(24_000, 400), test=(3, 2))[variant]
  high_res = dict(gpu=512, cpu=32, test=24)[variant]
  lr = dict(gpu=1e-5, cpu=1e-4, test=1e-4)[variant]  # later stages: short runs from a trained model
  curated = dict(gpu=100_000, cpu=2048, test=64)[variant]  # records of the sft split
  hires_steps = dict(gpu=40_000, cpu=8000, test=2)[variant]

  def later(**fields):
    """A later stage: short, its own lr and EMA, at the sft resolution."""
    fields.setdefault("optim", {}).update(lr=fields.get("optim", {}).get("lr", lr), warmup_steps=20,
                                          ema_decay=0.999 if variant == "gpu" else 0.99)
    fields["train"] = dict(num_steps=stage_steps, checkpoint_every=stage_steps, log_every=min(base.train.log_every,
                                                                                               stage_steps),
                           sample_every=0 if variant == "test" else stage_steps)
    fields.setdefault("data", {})["resolution"] = high_res
    return fields

  # Position interpolation from the first stage on (at the pre-training grid it is SD3's
  # crop itself): at a new resolution every token keeps its place in the frame, so what the
  # model learned of layout carries over (docs/stages.md; docs/notes.md measures it).
  base.model.pos_embed_interpolate = base.data.resolution // base.model.patch_size
  p = ml_collections.ConfigDict()
  p.base = base
  # guidance (a student with the guidance scale as an input, sampled with its usual steps) is
  # defined beside fewstep but left out of the order: the 4-step student embeds the guidance
  # itself. The test variant runs it too.
  p.order = "pretrain,hires,sft,dpo,grpo,tune," + ("guidance,fewstep" if variant == "test" else "fewstep")
  p.stages = ml_collections.ConfigDict(dict(
      pretrain=dict(train=dict(num_steps=pretrain_steps), data=dict(shapes_split="web")),
      hires=dict(train=dict(num_steps=hires_steps, checkpoint_every=hires_steps,
                            sample_every=0 if variant == "test" else hires_steps),
                 optim=dict(warmup_steps=min(50, hires_steps)),
                 # The web split filtered to images that show their one shape whole (no clutter,
                 # occlusion or off-centre crop), as production filters pre-training data by
                 # detector and quality scores; noise, blur, compression, casts and the garbled
                 # captions stay, for sft to clean up. At the new token scale the model relearns
                 # shape from such images, and loses it on the unfiltered ones (docs/notes.md).
                 data=dict(shapes_split="web", resolution=high_res, web=dict(clutter=0.0, occlusion=0.0, crop=0.0))),
      sft=later(stage="posttrain", data=dict(shapes_split="curated", shapes_size=curated)),
      # t ~ logit-normal(1, 1): the high-noise steps where layout, shape and colour are decided;
      # DPO-Positive keeps the preferred images' error from rising (docs/notes.md).
      dpo=later(stage="posttrain", objective="dpo", dpo=dict(beta=2000.0, positive=100.0),
                data=dict(source="preference"),
                diffusion=dict(timesteps=dict(mean=1.0))),
      # Online RL from the sft model (a branch beside dpo; tune continues from it): groups of
      # images per prompt from the SDE sampler, scored by the adherence analyser (jdiff/train/grpo.py).
      # Its prompts are captions of the benchmark's held-out colour-shape pairs (no image of
      # them is read; the benchmark scores other captions of those pairs), as Flow-GRPO trains
      # on prompts of the kind GenEval scores; dpo gets the same information (p.pairs below).
      grpo=later(stage="posttrain", objective="grpo", init_from="sft", data=dict(shapes_split="held_out")),
      tune=later(stage="tune", lora=dict(rank=8, alpha=8.0), optim=dict(trainable=".*lora_.*", lr=10 * lr),
                 data=dict(shapes_split="new_color")),
      # Both students distill the tuned model (branches beside each other) on-policy: each
      # learns at the states its own sampler reaches from the noise, where it will be when it
      # samples, instead of at noised data, which CFG's trajectories leave. So no image is
      # read, and they learn on the 'prompts' split's captions: the tuned colour half the
      # time, else every colour-shape pair, the unseen ones too, as the teacher is asked for
      # all of them (docs/notes.md measures both).
      guidance=later(stage="distill", objective="guidance", model=dict(guidance_embed=True),
                     data=dict(shapes_split="prompts"), distill=dict(states="student")),
      fewstep=later(stage="distill", objective="fewstep", init_from="tune", model=dict(guidance_embed=True),
                    data=dict(shapes_split="prompts"), distill=dict(student_steps=4, states="student"),
                    sample=dict(num_steps=4), eval=dict(num_steps=4)),
  ))
  # grpo: train.batch_size prompts a step, group_size images each (test: brightness, since the
  # tiny model's 32 caption tokens cut the captions the adherence reward reads).
  grpo_steps = dict(gpu=stage_steps, cpu=200, test=stage_steps)[variant]
  # dpo: about grpo's wall time (its pair sampling included).
  dpo_steps = dict(gpu=stage_steps, cpu=1000, test=stage_steps)[variant]
  p.stages.dpo.train.update(num_steps=dpo_steps, checkpoint_every=dpo_steps,
                            sample_every=0 if variant == "test" else dpo_steps)
  distill_steps = dict(gpu=stage_steps, cpu=1000, test=stage_steps)[variant]
  # tune: 400 cpu steps leave the new colour short on some seeds (0.78) and bleeding onto the
  # held-out pairs, whose colours no tune record anchors; 800 reach it and bleed less
  # (docs/notes.md, "The tune's length").
  tune_steps = dict(gpu=stage_steps, cpu=800, test=stage_steps)[variant]
  p.stages.tune.train.update(num_steps=tune_steps, checkpoint_every=tune_steps,
                             sample_every=0 if variant == "test" else tune_steps)
  for name in ("guidance", "fewstep"):
    p.stages[name].train.update(num_steps=distill_steps, checkpoint_every=distill_steps,
                                sample_every=0 if variant == "test" else distill_steps)
  p.stages.grpo.train.update(batch_size=dict(gpu=32, cpu=4, test=2)[variant], num_steps=grpo_steps,
                             checkpoint_every=grpo_steps, sample_every=0 if variant == "test" else grpo_steps,
                             log_every=min(base.train.log_every, 10))
  p.stages.grpo.grpo = dict(gpu=dict(), cpu=dict(), test=dict(group_size=2, num_steps=2, reward="brightness"))[variant]
  # On-policy preference data: before a listed stage trains, its parent (the sft model) is
  # sampled for `num` training captions and every sample the analyser finds wrong becomes
  # a rejected image against the caption's render (jdiff/eval/on_policy.py). '' = embedded pairs.
  # preferred='sample' (with samples_per_caption >= 2) pairs a wrong sample with a right one of
  # the same caption instead of its render, which also allows split='held_out' ('' = the parent's split).
  # cpu and gpu: the sft model samples each held-out caption 4 times and a wrong sample is
  # paired with a right one of the same caption (verifier-ranked, as grpo's reward); test: the
  # tiny model draws nothing right, so its wrong samples are paired with the renders.
  ranked = dict(preferred="sample", samples_per_caption=4, split="held_out")
  p.pairs = ml_collections.ConfigDict(dict(stages="dpo", num=dict(gpu=16384, cpu=1024, test=8)[variant],
                                           **(ranked if variant != "test" else
                                              dict(preferred="render", samples_per_caption=1, split=""))))
  # The table: prompts per benchmark split, and the teacher row (the stage that distillation
  # starts from, sampled with table.teacher_steps steps and CFG).
  # picture: prompts in the row of samples per stage drawn into stages.png.
  p.table = ml_collections.ConfigDict(dict(num_samples=480, teacher="tune", teacher_steps=50, picture=8))
  if variant == "test":
    p.stages.fewstep.distill.update(student_steps=2, teacher_substeps=2)
    p.stages.fewstep.sample.num_steps = p.stages.fewstep.eval.num_steps = 2
    p.table.update(num_samples=2, teacher_steps=3, picture=2)
  return p
