"""Kernel launches counted from compiled HLO text: loops, kinds, conditionals."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from loraswitch_jax.eval.bench.launches import count_launches, count_loop_launches

HLO = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8] get-tuple-element(%p), index=1
  %f = f32[8] fusion(%x), kind=kLoop, calls=%fused_a
  %g = f32[8] custom-call(%f), custom_call_target="__cublas$gemm"
  %n = s32[] fusion(%i), kind=kLoop, calls=%fused_b
  ROOT %t = (s32[], f32[8]) tuple(%n, %g)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] fusion(%i), kind=kLoop, calls=%fused_c
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8] parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[8]) tuple(%z, %a)
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}
"""


def test_launch_counting():
    # Body: two fusions and a GEMM; condition: one fusion. Plumbing launches nothing.
    assert count_loop_launches(HLO)["launches"] == 4
    with_copy = HLO.replace("  ROOT %t = (s32[], f32[8]) tuple(%n, %g)",
                            "  %c = f32[8] copy(%g)\n  ROOT %t = (s32[], f32[8]) tuple(%n, %c)")
    assert count_loop_launches(with_copy)["launches"] == 5
    # Tallied by kind: where a step's launches go.
    assert count_loop_launches(with_copy)["kinds"] == {
        "fusion:kLoop": 3, "custom-call:__cublas$gemm": 1, "copy": 1}
    triton = ('  %k = f32[8] custom-call(%f), custom_call_target="__gpu$xla.gpu.triton", '
              'backend_config={"name":"qkv_matmul_m16_n128_k128_s1_w4_st3","ir":"..."}\n')
    with_kernel = HLO.replace("  %n = s32[]", triton + "  %n = s32[]")
    assert count_loop_launches(with_kernel)["kinds"]["pallas:qkv_matmul"] == 1


def test_conditional_counts_its_largest_branch():
    """switch-merge's merge-if-the-route-changed: the conditional plus its larger branch."""
    def f(changed, w):
        return jax.lax.cond(changed, lambda w: jnp.sin(w) @ w + 1, lambda w: w, w)

    hlo = jax.jit(f).lower(True, jnp.ones((4, 4))).compile().as_text()
    entry = count_launches(hlo)
    assert entry["loops"] == 1
    assert entry["launches"] >= 2  # the conditional and at least one kernel of its big branch
