"""LoRA files in diffusers/PEFT and kohya naming (jdiff/interop/lora_files.py): what diffusers
loads from them reproduces jdiff's adapted transformer, the kohya layers are the ones of the
original checkpoints (checked through diffusers' own single-file converter), and files read
back give the adapters bit for bit."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.loaders import single_file_utils

from jdiff.interop import flux, lora_files, mapping, sd3
from jdiff.models import flux as flux_model
from jdiff.models import layers, mmdit

import helpers
import test_interop_flux as tflux
import test_interop_sd3 as tsd3


def _adapted(model, params, *args, seed=1, **kwargs):
  """`params` plus the model's adapters: A at its init, B random (zero at init), so every
  adapter changes the output."""
  fresh = nn.unbox(model.init(jax.random.key(0), *args, **kwargs)["params"])
  rng = np.random.default_rng(seed)
  params = jax.tree.map(np.asarray, params)
  for path, value in mapping._flatten(fresh):
    if path[-1].startswith("lora_"):
      node = params
      for part in path[:-1]:
        node = node[part]
      node[path[-1]] = (np.asarray(value) if path[-1] == "lora_a" else
                        0.1 * rng.standard_normal(value.shape).astype(np.float32))
  return params


def _only_lora(params):
  return {"/".join(p): v for p, v in mapping._flatten(params) if p[-1].startswith("lora_")}


def _assert_read_back(rules, params, scale, *read):
  """Each of `read` (adapters read from a file) gives `params`' adapters bit for bit."""
  want = _only_lora(params)
  for adapters in read:
    got = _only_lora(lora_files.adapters_to_params(rules, adapters, scale))
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _sd3_case():
  ref = tsd3.reference("sd3.5-medium")
  config = dict(ref.config)
  kwargs = sd3.model_kwargs(config)
  x, t, context, pooled = tsd3.inputs((8, 8))
  spec = layers.LoRA(rank=4, alpha=2.0)
  model = mmdit.MMDiT(**kwargs, attention="xla", lora=spec)
  params = _adapted(model, sd3.to_jdiff(config, tsd3.state_dict(ref)), x, t, context=context, pooled=pooled)
  ours = np.asarray(model.apply({"params": params}, x, t, context=context, pooled=pooled))
  return ref, kwargs, spec, params, (x, t, context, pooled), ours


def _to_sai(sd, kwargs):
  """A diffusers SD3 state dict in Stability's MMDiT layout: the linear layers through
  lora_files.sd3_layers (concatenated parts, swapped halves), the rest renamed here."""
  out, used = {}, set()
  for layer in lora_files.sd3_layers(kwargs):
    for suffix in ("weight", "bias"):
      w = np.concatenate([sd[f"{p}.{suffix}"] for p in layer.parts])
      out[f"{layer.key}.{suffix}"] = lora_files._swap(w) if layer.swap else w
      used |= {f"{p}.{suffix}" for p in layer.parts}
  renames = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj.weight": "x_embedder.proj.weight",
             "pos_embed.proj.bias": "x_embedder.proj.bias"}
  for i in range(kwargs["depth"]):
    d, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
    renames.update({f"{d}.attn.norm_q.weight": f"{o}.x_block.attn.ln_q.weight",
                    f"{d}.attn.norm_k.weight": f"{o}.x_block.attn.ln_k.weight",
                    f"{d}.attn.norm_added_q.weight": f"{o}.context_block.attn.ln_q.weight",
                    f"{d}.attn.norm_added_k.weight": f"{o}.context_block.attn.ln_k.weight",
                    f"{d}.attn2.norm_q.weight": f"{o}.x_block.attn2.ln_q.weight",
                    f"{d}.attn2.norm_k.weight": f"{o}.x_block.attn2.ln_k.weight"})
  for ours, theirs in renames.items():
    if ours in sd:
      out[theirs] = sd[ours]
      used.add(ours)
  assert used == set(sd), sorted(set(sd) - used)
  return out


def test_sd3_layers_are_stabilitys_mmdit_layout():
  """Fusing a diffusers SD3.5-Medium state dict by lora_files.sd3_layers gives a checkpoint
  that diffusers' single-file converter turns back into the same state dict."""
  ref = tsd3.reference("sd3.5-medium")
  sd = tsd3.state_dict(ref)
  sai = _to_sai(sd, sd3.model_kwargs(dict(ref.config)))
  back = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(
      {k: torch.from_numpy(v) for k, v in sai.items()})
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k].numpy(), sd[k], err_msg=k)


def test_sd3_lora_files_reproduce_the_adapted_transformer():
  """SD3.5-Medium with adapters on every attention (dual included) and MLP projection:
  - diffusers naming, read by StableDiffusion3Pipeline.lora_state_dict and loaded into the
    diffusers transformer, gives jdiff's adapted output;
  - kohya naming: its deltas added to the Stability-layout weights, converted by diffusers'
    single-file converter, give the same output (diffusers has no kohya reader for SD3;
    ComfyUI and Forge apply the deltas on those layers);
  - both files read back give the adapters bit for bit (power-of-two scale)."""
  ref, kwargs, spec, params, args, ours = _sd3_case()
  rules = sd3.rules(kwargs)
  adapters = lora_files.adapters_from_params(rules, params, spec.scale)
  peft = lora_files.to_peft(adapters)
  assert lora_files.naming_of(peft) == "diffusers" and "transformer.transformer_blocks.0.attn2.to_q.lora_A.weight" in peft
  state = StableDiffusion3Pipeline.lora_state_dict({k: torch.from_numpy(v) for k, v in peft.items()})
  ref.load_lora_adapter(state, prefix="transformer")
  helpers.assert_parity(ours, tsd3.torch_forward(ref, *args))
  plain = tsd3.jdiff_forward(dict(ref.config), params, *args)  # adapters ignored
  assert np.abs(ours - plain).max() > 1e-2 * np.abs(plain).max()

  widths = lora_files.output_widths(rules, params)
  kohya = lora_files.to_kohya(adapters, lora_files.sd3_layers(kwargs), widths)
  assert lora_files.naming_of(kohya) == "kohya"
  assert kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape == (3 * spec.rank, 32)
  assert float(kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"]) == 3 * spec.rank * spec.scale
  base = tsd3.reference("sd3.5-medium")
  sai = _to_sai(tsd3.state_dict(base), kwargs)
  for key in kohya:
    if key.endswith(".lora_down.weight"):
      name = key[:-len(".lora_down.weight")]
      down, up = kohya[key], kohya[f"{name}.lora_up.weight"]
      target = name[len("lora_unet_"):]
      target = next(k for k in sai if k.replace(".", "_") == target + "_weight")
      sai[target] = sai[target] + float(kohya[f"{name}.alpha"]) / down.shape[0] * up @ down
  merged = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(
      {k: torch.from_numpy(v) for k, v in sai.items()})
  base.load_state_dict(merged)
  helpers.assert_parity(ours, tsd3.torch_forward(base, *args))

  _assert_read_back(rules, params, spec.scale, lora_files.from_kohya(kohya, lora_files.sd3_layers(kwargs), widths),
                    lora_files.from_peft(peft))


def test_kohya_import_of_a_dense_fused_adapter_keeps_its_function():
  """A fused qkv adapter trained elsewhere (one down shared by q, k and v, a dense up):
  every part gets the shared down and its rows of up, so the parts' deltas stacked are the
  file's delta; an adapter on a layer the model lacks, or rows that do not fit, fail."""
  kwargs = sd3.model_kwargs(dict(tsd3.reference("sd3").config))
  layers_ = lora_files.sd3_layers(kwargs)
  widths = {f"transformer_blocks.0.attn.to_{p}": 32 for p in "qkv"}
  rng = np.random.default_rng(0)
  down, up = rng.standard_normal((6, 32)).astype(np.float32), rng.standard_normal((96, 6)).astype(np.float32)
  name = "lora_unet_joint_blocks_0_x_block_attn_qkv"
  file = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": np.float32(3.0)}
  got = lora_files.from_kohya(file, layers_, widths)
  assert sorted(got) == sorted(widths)
  delta = np.concatenate([(a @ b * s).T for a, b, s in (got[f"transformer_blocks.0.attn.to_{p}"] for p in "qkv")])
  np.testing.assert_allclose(delta, 0.5 * up @ down, rtol=1e-6)
  with pytest.raises(ValueError, match="lora_up has 96 rows"):
    lora_files.from_kohya(file, layers_, dict(widths, **{"transformer_blocks.0.attn.to_v": 16}))
  with pytest.raises(ValueError, match="not a layer"):
    lora_files.from_kohya({"lora_unet_nope.lora_down.weight": down, "lora_unet_nope.lora_up.weight": up}, layers_,
                          widths)
  with pytest.raises(ValueError, match="not a LoRA file"):
    lora_files.naming_of({"model.weight": down})


def _flux_case():
  ref = tflux.reference(True, seed=3)
  config = dict(ref.config)
  kwargs = flux.model_kwargs(config)
  a = tflux.inputs((8, 8))
  spec = layers.LoRA(rank=2, alpha=4.0)
  model = flux_model.Flux(**kwargs, attention="xla", lora=spec)
  params = _adapted(model, flux.to_jdiff(config, tflux.state_dict(ref)), a["x"], a["t"], context=a["context"],
                    pooled=a["pooled"], guidance=a["guidance"])
  apply = lambda p: np.asarray(model.apply({"params": p}, a["x"], a["t"], context=a["context"], pooled=a["pooled"],
                                           guidance=a["guidance"]))
  return ref, kwargs, spec, params, a, apply


def test_flux_lora_files_load_in_diffusers_and_read_back():
  """Flux-dev-like, adapters on every block projection (the single blocks' q, k, v and MLP
  input included):
  - diffusers naming, through FluxPipeline.lora_state_dict, gives jdiff's adapted output;
  - kohya naming: FluxPipeline.lora_state_dict converts its double-block and single-block
    linear2 layers (diffusers' reader sizes the single blocks' linear1 for the 12B model
    only), which reproduce jdiff's output with the single blocks' q, k, v, MLP-input
    adapters off; linear1's delta is theirs stacked in the order of diffusers' single-file
    converter (q, k, v, mlp);
  - both read back bit for bit."""
  ref, kwargs, spec, params, a, apply = _flux_case()
  rules = flux.rules(kwargs)
  adapters = lora_files.adapters_from_params(rules, params, spec.scale)
  peft = lora_files.to_peft(adapters)
  state = FluxPipeline.lora_state_dict({k: torch.from_numpy(v) for k, v in peft.items()})
  ref.load_lora_adapter(state, prefix="transformer")
  helpers.assert_parity(apply(params), tflux.torch_forward(ref, a))

  widths = lora_files.output_widths(rules, params)
  layers_ = lora_files.flux_layers(kwargs)
  kohya = lora_files.to_kohya(adapters, layers_, widths)
  assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in kohya
  assert "lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight" in kohya
  linear1 = [k for k in kohya if "_linear1." in k]
  fused_single = {k: torch.from_numpy(v) for k, v in kohya.items() if k not in linear1}
  state = FluxPipeline.lora_state_dict(fused_single)
  fresh = tflux.reference(True, seed=3)
  fresh.load_lora_adapter(state, prefix="transformer")
  off = jax.tree.map(lambda x: x, params)
  for i in range(kwargs["single_depth"]):
    block = off[f"single_blocks_{i}"]
    for node in (block["qkv"]["q"], block["qkv"]["k"], block["qkv"]["v"], block["mlp_in"]):
      node["lora_b"] = np.zeros_like(node["lora_b"])
  helpers.assert_parity(apply(off), tflux.torch_forward(fresh, a))
  assert np.abs(apply(off) - apply(params)).max() > 1e-3 * np.abs(apply(params)).max()
  for i in range(kwargs["single_depth"]):
    name = f"lora_unet_single_blocks_{i}_linear1"
    down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
    fused = float(kohya[f"{name}.alpha"]) / down.shape[0] * up @ down
    d = f"single_transformer_blocks.{i}"
    parts = [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"]
    stacked = np.concatenate([peft[f"transformer.{p}.lora_B.weight"] @ peft[f"transformer.{p}.lora_A.weight"]
                              for p in parts])
    np.testing.assert_allclose(fused, stacked, rtol=1e-5, atol=1e-7)

  _assert_read_back(rules, params, spec.scale, lora_files.from_kohya(kohya, layers_, widths),
                    lora_files.from_peft(peft))


def test_kohya_export_of_some_parts_of_a_fused_layer():
  """Adapters on q and v only: the fused layer keeps rank 3r with zero blocks for k, reads
  back to q and v alone, and adapters on layers without a kohya name are refused."""
  r = 2
  rng = np.random.default_rng(1)
  widths = {f"transformer_blocks.0.attn.to_{p}": 8 for p in "qkv"}
  adapters = {f"transformer_blocks.0.attn.to_{p}": (rng.standard_normal((6, r)).astype(np.float32),
                                                    rng.standard_normal((r, 8)).astype(np.float32), 0.5)
              for p in "qv"}
  layers_ = [lora_files.Fused("joint_blocks.0.x_block.attn.qkv", tuple(widths))]
  kohya = lora_files.to_kohya(adapters, layers_, widths)
  up = kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"]
  assert up.shape == (24, 3 * r) and not up[8:16].any()
  back = lora_files.from_kohya(kohya, layers_, widths)
  assert sorted(back) == sorted(adapters)
  for k, (a, b, s) in adapters.items():
    np.testing.assert_array_equal(back[k][0], a)
    np.testing.assert_array_equal(back[k][1], b)
    assert back[k][2] == s
  with pytest.raises(ValueError, match="does not name"):
    lora_files.to_kohya({"pos_embed.proj": adapters["transformer_blocks.0.attn.to_q"]}, layers_, widths)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  import sd3_fixture
  path = str(tmp_path_factory.mktemp("sd3_pipeline"))
  sd3_fixture.make_pipeline(path, seed=5, with_t5=False)
  return path


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_import_lora_cli_round_trip(pipeline_dir, tmp_path, scan):
  """`jdiff.convert import_lora` puts a kohya file's adapters on an imported SD3.5-like
  pipeline: the workdir's model gives the adapted output, export_lora writes both files back
  bit for bit (StableDiffusion3Pipeline.load_lora_weights reads the diffusers one and gives
  the same output), --merge folds them into the weights with the same output, and a base
  that already has adapters is refused."""
  import safetensors.numpy
  from jdiff import inference
  from jdiff.hf import workdirs
  from jdiff.interop import sd3_pipeline

  _, kwargs, plain = sd3_pipeline.load_transformer(pipeline_dir)
  x, t, context, pooled = tsd3.inputs((8, 8))
  x = np.concatenate([x] * 4, -1)  # the fixture's latents have 16 channels
  context = np.random.default_rng(2).standard_normal(context.shape[:2] + (kwargs["context_dim"],), np.float32)
  pooled = np.random.default_rng(3).standard_normal((2, kwargs["pooled_dim"]), np.float32)
  spec = layers.LoRA(rank=4, alpha=2.0)
  model = mmdit.MMDiT(**kwargs, attention="xla", lora=spec)
  params = _adapted(model, plain, x, t, context=context, pooled=pooled)
  ours = np.asarray(model.apply({"params": params}, x, t, context=context, pooled=pooled))
  base = str(tmp_path / "base")
  workdirs.import_dir(pipeline_dir, base, scan=scan)
  rules = sd3.rules(kwargs)
  adapters = lora_files.adapters_from_params(rules, params, spec.scale)
  kohya = lora_files.to_kohya(adapters, lora_files.sd3_layers(kwargs), lora_files.output_widths(rules, params))
  safetensors.numpy.save_file(kohya, str(tmp_path / "mine.safetensors"))

  def forward(workdir):  # the workdir's weights and LoRA, in float32 (the import keeps the default bf16 compute)
    loaded = inference.load(workdir)
    net = mmdit.MMDiT(**kwargs, attention="xla", scan=loaded.config.model.scan, lora=loaded.networks.lora)
    return np.asarray(net.apply({"params": loaded.params["denoiser"]}, x, t, context=context, pooled=pooled))

  info = workdirs.import_lora_dir(str(tmp_path / "mine.safetensors"), base, str(tmp_path / "adapted"))
  assert info["naming"] == "kohya" and info["rank"] == spec.rank and info["alpha"] == spec.alpha
  np.testing.assert_allclose(forward(str(tmp_path / "adapted")), ours, rtol=1e-5, atol=1e-5)
  for naming, want in (("kohya", kohya), ("diffusers", lora_files.to_peft(adapters))):
    out = workdirs.export_lora_dir(str(tmp_path / "adapted"), str(tmp_path / naming), naming=naming)
    got = safetensors.numpy.load_file(out["file"])
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  if not scan:  # the pipeline's own loader reads the diffusers-named file
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(tmp_path / "diffusers"))
    helpers.assert_parity(ours, tsd3.torch_forward(pipe.transformer.eval(), x, t, context, pooled))
  workdirs.import_lora_dir(str(tmp_path / "diffusers" / workdirs.LORA_FILE), base, str(tmp_path / "merged"), merge=True)
  assert inference.load(str(tmp_path / "merged")).networks.lora is None
  np.testing.assert_allclose(forward(str(tmp_path / "merged")), ours, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="already has LoRA adapters"):
    workdirs.import_lora_dir(str(tmp_path / "mine.safetensors"), str(tmp_path / "adapted"), str(tmp_path / "again"))
