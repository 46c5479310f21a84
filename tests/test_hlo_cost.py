"""benchmarks/hlo_cost.py: the per-kernel bytes, FLOPs and counts of compiled HLO, checked on a
hand-written module with hand-computed answers and on XLA:CPU's compilation of a scan."""

import jax
import jax.numpy as jnp
import pytest

from helpers import benchmark_module

hlo_cost = benchmark_module("hlo_cost")

# A while loop of 3 trips over stacked [3, 4, 8] f32 buffers: each trip reads one slice of
# %stack (fusion.1), multiplies by a [8, 16] weight on cuBLAS, and writes a slice of %out in
# place (fusion.2). After the loop, a conditional whose larger branch copies 4 KiB, and a
# cuDNN attention call.
MODULE = r"""
HloModule test, entry_computation_layout={(f32[3,4,8]{2,1,0})->f32[3,4,8]{2,1,0}}

%fused_slice_add (param_0.1: f32[3,4,8], param_1.1: s32[], param_2.1: f32[4,8]) -> f32[4,8] {
  %param_0.1 = f32[3,4,8]{2,1,0} parameter(0)
  %param_1.1 = s32[] parameter(1)
  %constant_0 = s32[] constant(0)
  %dynamic-slice.1 = f32[1,4,8]{2,1,0} dynamic-slice(%param_0.1, %param_1.1, %constant_0, %constant_0), dynamic_slice_sizes={1,4,8}
  %bitcast.1 = f32[4,8]{1,0} bitcast(%dynamic-slice.1)
  %param_2.1 = f32[4,8]{1,0} parameter(2)
  ROOT %add.1 = f32[4,8]{1,0} add(%bitcast.1, %param_2.1)
}

%fused_dus (param_0.2: f32[3,4,16], param_1.2: f32[4,16], param_2.2: s32[]) -> f32[3,4,16] {
  %param_0.2 = f32[3,4,16]{2,1,0} parameter(0)
  %param_1.2 = f32[4,16]{1,0} parameter(1)
  %bitcast.2 = f32[1,4,16]{2,1,0} bitcast(%param_1.2)
  %param_2.2 = s32[] parameter(2)
  %constant_1 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[3,4,16]{2,1,0} dynamic-update-slice(%param_0.2, %bitcast.2, %param_2.2, %constant_1, %constant_1)
}

%body (p.1: (s32[], f32[3,4,8], f32[3,4,16], f32[4,8], f32[8,16])) -> (s32[], f32[3,4,8], f32[3,4,16], f32[4,8], f32[8,16]) {
  %p.1 = (s32[], f32[3,4,8]{2,1,0}, f32[3,4,16]{2,1,0}, f32[4,8]{1,0}, f32[8,16]{1,0}) parameter(0)
  %gte.0 = s32[] get-tuple-element(%p.1), index=0
  %gte.1 = f32[3,4,8]{2,1,0} get-tuple-element(%p.1), index=1
  %gte.2 = f32[3,4,16]{2,1,0} get-tuple-element(%p.1), index=2
  %gte.3 = f32[4,8]{1,0} get-tuple-element(%p.1), index=3
  %gte.4 = f32[8,16]{1,0} get-tuple-element(%p.1), index=4
  %fusion.1 = f32[4,8]{1,0} fusion(%gte.1, %gte.0, %gte.3), kind=kLoop, calls=%fused_slice_add, metadata={op_name="jit(f)/while/body/add"}
  %gemm.1 = (f32[4,16]{1,0}, s8[4096]{0}) custom-call(%fusion.1, %gte.4), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %gte.5 = f32[4,16]{1,0} get-tuple-element(%gemm.1), index=0
  %fusion.2 = f32[3,4,16]{2,1,0} fusion(%gte.2, %gte.5, %gte.0), kind=kLoop, calls=%fused_dus
  %constant_2 = s32[] constant(1)
  %add.2 = s32[] add(%gte.0, %constant_2)
  ROOT %tuple.1 = (s32[], f32[3,4,8]{2,1,0}, f32[3,4,16]{2,1,0}, f32[4,8]{1,0}, f32[8,16]{1,0}) tuple(%add.2, %gte.1, %fusion.2, %gte.3, %gte.4)
}

%cond (p.2: (s32[], f32[3,4,8], f32[3,4,16], f32[4,8], f32[8,16])) -> pred[] {
  %p.2 = (s32[], f32[3,4,8]{2,1,0}, f32[3,4,16]{2,1,0}, f32[4,8]{1,0}, f32[8,16]{1,0}) parameter(0)
  %gte.6 = s32[] get-tuple-element(%p.2), index=0
  %constant_3 = s32[] constant(3)
  ROOT %lt = pred[] compare(%gte.6, %constant_3), direction=LT
}

%branch_small (p.3: f32[32,32]) -> f32[32,32] {
  %p.3 = f32[32,32]{1,0} parameter(0)
  ROOT %negate.1 = f32[32,32]{1,0} negate(%p.3)
}

%branch_copy (p.4: f32[32,32]) -> f32[32,32] {
  %p.4 = f32[32,32]{1,0} parameter(0)
  %copy.1 = f32[32,32]{1,0} copy(%p.4)
  ROOT %copy.2 = f32[32,32]{1,0} copy(%copy.1)
}

ENTRY %main (Arg_0: f32[3,4,8], Arg_1: f32[4,8], Arg_2: f32[8,16], Arg_3: f32[32,32], Arg_4: s32[], q: bf16[2,6,3,4], k: bf16[2,5,3,4], v: bf16[2,5,3,4]) -> f32[3,4,16] {
  %Arg_0 = f32[3,4,8]{2,1,0} parameter(0)
  %Arg_1 = f32[4,8]{1,0} parameter(1)
  %Arg_2 = f32[8,16]{1,0} parameter(2)
  %Arg_3 = f32[32,32]{1,0} parameter(3)
  %Arg_4 = s32[] parameter(4)
  %q = bf16[2,6,3,4]{3,2,1,0} parameter(5)
  %k = bf16[2,5,3,4]{3,2,1,0} parameter(6)
  %v = bf16[2,5,3,4]{3,2,1,0} parameter(7)
  %zero = f32[] constant(0)
  %broadcast.1 = f32[3,4,16]{2,1,0} broadcast(%zero), dimensions={}
  %start = s32[] constant(0)
  %tuple.2 = (s32[], f32[3,4,8]{2,1,0}, f32[3,4,16]{2,1,0}, f32[4,8]{1,0}, f32[8,16]{1,0}) tuple(%start, %Arg_0, %broadcast.1, %Arg_1, %Arg_2)
  %while.1 = (s32[], f32[3,4,8]{2,1,0}, f32[3,4,16]{2,1,0}, f32[4,8]{1,0}, f32[8,16]{1,0}) while(%tuple.2), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"},"known_init_step":{"init":"0","step":"1"}}
  %conditional.1 = f32[32,32]{1,0} conditional(%Arg_4, %Arg_3, %Arg_3), branch_computations={%branch_small, %branch_copy}
  %attention.1 = (bf16[2,3,6,4]{3,1,2,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"cudnn_fmha_backend_config": {"intermediate_tensor_shape": {"element_type": "BF16", "dimensions": ["2", "3", "6", "5"]}}}
  ROOT %gte.7 = f32[3,4,16]{2,1,0} get-tuple-element(%while.1), index=2
}
"""


def _by_name(kernels):
  return {k.name: k for k in kernels}


def test_hand_written_module_bytes_flops_and_counts():
  ks = _by_name(hlo_cost.kernels(MODULE))
  # fusion.1 reads one [4, 8] f32 slice (128 B) of the stack, the s32 index (4 B) and the
  # [4, 8] addend (128 B), and writes [4, 8] (128 B); three trips.
  assert ks["fusion.1"].bytes == 128 + 4 + 128 + 128 and ks["fusion.1"].count == 3
  assert ks["fusion.1"].kind == "fusion" and ks["fusion.1"].op_name == "jit(f)/while/body/add"
  # cuBLAS: [4, 8] @ [8, 16]: 2*4*16*8 FLOPs; reads 128 + 512 B, writes 256 B (not the workspace).
  assert ks["gemm.1"].kind == "gemm" and ks["gemm.1"].flops == 2 * 4 * 16 * 8
  assert ks["gemm.1"].bytes == 128 + 512 + 256 and ks["gemm.1"].count == 3
  # In-place update: the [3, 4, 16] target is neither read nor rewritten, only the [4, 16] slice.
  assert ks["fusion.2"].bytes == 256 + 4 + 256
  # Outside the loop: the broadcast (one launch, writes 768 B) and the larger branch (two copies).
  assert ks["broadcast.1"].count == 1 and ks["broadcast.1"].bytes == 3 * 4 * 16 * 4 + 4
  assert "negate.1" not in ks and ks["copy.1"].bytes == ks["copy.2"].bytes == 2 * 32 * 32 * 4
  assert ks["copy.1"].kind == "copy"
  # cuDNN attention: 4*B*N*T*S*H with [B, N, T, S] = [2, 3, 6, 5] and H = 4.
  assert ks["attention.1"].kind == "attention" and ks["attention.1"].flops == 4 * 2 * 3 * 6 * 5 * 4
  assert set(ks) == {"fusion.1", "gemm.1", "fusion.2", "add.2", "broadcast.1", "copy.1", "copy.2", "attention.1"}


# Fusions reading a parameter through a bitcast: fusion.3 slices the bitcast (reads the slice
# only); fusion.4 also returns the bitcast (reads all of it); fusion.5's root is the bitcast.
BITCAST_MODULE = r"""
HloModule bitcasts, entry_computation_layout={(f32[6,8]{1,0})->f32[2,8]{1,0}}

%fused_slice_of_bitcast (param_0.3: f32[6,8]) -> f32[2,8] {
  %param_0.3 = f32[6,8]{1,0} parameter(0)
  %bitcast.3 = f32[3,2,8]{2,1,0} bitcast(%param_0.3)
  %slice.1 = f32[1,2,8]{2,1,0} slice(%bitcast.3), slice={[1:2], [0:2], [0:8]}
  ROOT %bitcast.4 = f32[2,8]{1,0} bitcast(%slice.1)
}

%fused_bitcast_returned (param_0.4: f32[6,8]) -> (f32[3,2,8], f32[2,8]) {
  %param_0.4 = f32[6,8]{1,0} parameter(0)
  %bitcast.5 = f32[3,2,8]{2,1,0} bitcast(%param_0.4)
  %slice.2 = f32[1,2,8]{2,1,0} slice(%bitcast.5), slice={[0:1], [0:2], [0:8]}
  %bitcast.6 = f32[2,8]{1,0} bitcast(%slice.2)
  ROOT %tuple.3 = (f32[3,2,8]{2,1,0}, f32[2,8]{1,0}) tuple(%bitcast.5, %bitcast.6)
}

%fused_bitcast_root (param_0.5: f32[6,8]) -> f32[3,2,8] {
  %param_0.5 = f32[6,8]{1,0} parameter(0)
  %slice.3 = f32[2,8]{1,0} slice(%param_0.5), slice={[0:2], [0:8]}
  ROOT %bitcast.7 = f32[3,2,8]{2,1,0} bitcast(%param_0.5)
}

ENTRY %main (a: f32[6,8]) -> f32[2,8] {
  %a = f32[6,8]{1,0} parameter(0)
  %fusion.3 = f32[2,8]{1,0} fusion(%a), kind=kLoop, calls=%fused_slice_of_bitcast
  %fusion.4 = (f32[3,2,8]{2,1,0}, f32[2,8]{1,0}) fusion(%a), kind=kLoop, calls=%fused_bitcast_returned
  %fusion.5 = f32[3,2,8]{2,1,0} fusion(%a), kind=kLoop, calls=%fused_bitcast_root
  ROOT %gte.8 = f32[2,8]{1,0} get-tuple-element(%fusion.4), index=1
}
"""


def test_a_slice_read_through_a_bitcast_counts_as_the_slice():
  ks = _by_name(hlo_cost.kernels(BITCAST_MODULE))
  assert ks["fusion.3"].bytes == 64 + 64  # the [2, 8] slice of the [6, 8] input, and its result
  assert ks["fusion.4"].bytes == 192 + 192 + 64  # the whole input (returned), both results
  assert ks["fusion.5"].bytes == 192 + 192  # the whole input (the root reinterprets it), the result


def test_seconds_is_the_roofline_of_bytes_and_flops():
  rates = hlo_cost.Rates(bandwidth=1e3, gemm=1e4, attention=1e2, launch=0.5)
  ks = _by_name(hlo_cost.kernels(MODULE))
  gemm = ks["gemm.1"]  # 896 B at 1e3 B/s = 0.896 s > 1024 FLOP at 1e4 FLOP/s
  assert gemm.seconds(rates) == pytest.approx(3 * (0.896 + 0.5))
  attn = ks["attention.1"]  # 2880 FLOP at 1e2 FLOP/s = 28.8 s > its bytes
  assert attn.seconds(rates) == pytest.approx(28.8 + 0.5)
  s = hlo_cost.summarize(list(ks.values()), rates)
  assert s["total_s"] == pytest.approx(sum(k.seconds(rates) for k in ks.values()))
  assert s["kinds"]["gemm"]["flops"] == 3 * 1024 and s["kinds"]["gemm"]["launches"] == 3


def test_counts_the_matmuls_of_a_compiled_scan():
  """XLA:CPU's compiled scan of 5 matmuls: the while body's dots count 5 times, 2*M*N*K each."""
  def f(x, ws):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

  x, ws = jnp.ones((16, 32)), jnp.ones((5, 32, 32))
  text = jax.jit(f).lower(x, ws).compile().as_text()
  gemms = [k for k in hlo_cost.kernels(text) if k.kind == "gemm"]
  assert sum(k.flops * k.count for k in gemms) == 5 * 2 * 16 * 32 * 32


def test_op_names_are_shortened_and_unrolled_blocks_grouped():
  short = hlo_cost._short  # pylint: disable=protected-access
  assert short("jit(train_step)/jvp(MMDiT)/while/body/closed_call/checkpoint/blocks/x_mlp/fc1/dot_general") \
      == "jvp(MMDiT)/blocks/x_mlp/fc1/dot_general"
  assert short("jit(train_step)/transpose(jvp(MMDiT))/blocks_17/mul") == "transpose(jvp(MMDiT))/blocks/mul"


def test_counts_what_xla_rematerialised_to_fit_memory():
  from jdiff.train.trainer import xla_rematerialized  # pylint: disable=g-import-not-at-top

  text = MODULE.replace("%fusion.1", "%fusion.1.remat").replace("ROOT %gte.7 = ", "ROOT %gte.7.remat2 = ")
  assert xla_rematerialized(MODULE) == 0 and xla_rematerialized(text) == 2
  # jax.checkpoint's planned recomputation keeps names; only its metadata says so.
  assert xla_rematerialized('  %fusion.9 = f32[2]{0} fusion(%p), metadata={op_name="a/rematted_computation/b"}') == 0
  assert hlo_cost.report(text, hlo_cost.Rates(), top=1)["rematerialized"] == 2


def test_listing_shows_the_matching_kernels_with_what_they_fuse():
  rates = hlo_cost.Rates(bandwidth=1e3, gemm=1e4, attention=1e2, launch=0.5)
  lines = hlo_cost.listing(hlo_cost.kernels(MODULE), r"while/body", rates)
  # Only fusion.1 carries that op_name: 3 launches of 388 B at 1e3 B/s + 0.5 s = 2.664 s,
  # 1164 B in all; it writes f32[4, 8] from a dynamic-slice and an add (bitcasts launch nothing).
  assert len(lines) == 1
  assert lines[0].startswith("F fusion") and " 2664.000 ms " in lines[0] and " 0.0 MB " in lines[0]
  assert lines[0].endswith("f32[4,8]{1,0} | dynamic-slice:1 add:1")
  assert hlo_cost.listing(hlo_cost.kernels(MODULE), r"no such op", rates) == []


def test_targets_are_complete_gpu_descriptions():
  """Each target leaves only the memory size to fill in; the H200 is the H100 with its own
  bandwidth, name and rates."""
  import re  # pylint: disable=g-import-not-at-top

  for target in hlo_cost.TARGETS.values():
    assert re.findall(r"\{(\w+)\}", target) == ["device_memory_bytes"]
  h100, h200 = hlo_cost.TARGETS["h100"], hlo_cost.TARGETS["h200"]
  assert "memory_bandwidth: 3352320000000" in h100 and "memory_bandwidth: 4800000000000" in h200
  same = lambda t: re.sub(r"memory_bandwidth: \d+|device_description_str: .*", "", t)
  assert same(h100) == same(h200)
  assert hlo_cost.RATES["h200"].bandwidth > hlo_cost.RATES["h100"].bandwidth
  assert set(hlo_cost.RATES) == set(hlo_cost.TARGETS) == set(hlo_cost.DEVICE_MEMORY_GIB)
