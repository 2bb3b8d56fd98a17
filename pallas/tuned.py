"""The tuned defaults of the kernels and their dispatch, each with what it was measured against.

One row per default: the choice, the alternatives measured with their numbers, the ratio that
decided it, the GPU, JAX version and date of the run and the result file (under the repository
root). Code that picks a default cites this module in one line; the constants below are the
values it reads. Unless a row says otherwise the adapter runs are Llama-2-7B shapes, E 8, r 16,
k 2, context 1024, routes changing on every step, decode time over the backbone's in the same
run; kernel runs are M = 1, bf16, 32 stacked layers, the layer index as data.
"""

from __future__ import annotations

import dataclasses

__all__ = ["DEFAULTS", "MAX_EXPAND_ROWS", "UNROLLED_BYTES", "UNROLLED_GROUPS", "Tuned"]

# Gather-mode expansions of at most this many real rows run in registers ("rows" below).
MAX_EXPAND_ROWS = 4
# Expansion dots per program, and bytes of their operands, up to which they are unrolled.
UNROLLED_GROUPS = 8
UNROLLED_BYTES = 192 * 1024

_GPU = "NVIDIA H100 80GB HBM3"
_JAX = "0.11.2"
_DATE = "2026-11-23"


@dataclasses.dataclass(frozen=True)
class Tuned:
    """One tuned default: ``what`` is chosen, ``default`` the choice, ``measured`` the
    alternatives with their numbers, ``ratio`` what decided it, and where it was measured."""

    what: str
    default: str
    measured: str
    ratio: str
    source: str
    gpu: str = _GPU
    jax: str = _JAX
    date: str = _DATE


DEFAULTS: tuple[Tuned, ...] = (
    Tuned(
        what="routed LoRA shrink x A (ops: split grouped shrink for q/k/v and gate/up, down's in "
             "the gate/up kernel's epilogue; XLA only under dropout)",
        default="epilogue",
        measured="batch 1: pallas-split 1.142x, unsplit pallas 1.266x, xla 1.70x, inline (x A "
                 "recomputed in every program) 17.7x; epilogue 1.144x vs pallas-split 1.138x "
                 "(one run, within noise); batch 8: epilogue 1.260x vs pallas-split 1.304x; "
                 "batch 32: 1.145x vs 1.178x; batch 64: 1.124x vs 1.119x (unsplit 1.118x, xla "
                 "1.121x in an earlier run)",
        ratio="epilogue/pallas-split 0.966 at batch 8, 0.972 at batch 32; pallas-split/pallas "
              "0.902 at batch 1",
        source="eval/results/archive/adapters/{slot_major_shrink_inline_b1-64,"
               "shrink_xla_vs_grouped,attention_kernel_split_shrink,expand_placement_b1-8,"
               "down_shrink_epilogue}.md",
    ),
    Tuned(
        what="decode attention (ops.cached_attention, where decode_attention.supports)",
        default="pallas decode_attention kernel",
        measured="backbone 5.585 vs XLA attention 6.108 ms/token at batch 1; 12.01 vs 13.86 at "
                 "batch 32",
        ratio="0.914x at batch 1, 0.867x at batch 32",
        source="eval/results/archive/adapters/attention_kernel_split_shrink.md",
    ),
    Tuned(
        what="expansion (x A) B in the routed kernels (gather slots, <= MAX_EXPAND_ROWS rows; "
             "dot elsewhere)",
        default="rows",
        measured="switch decode at batch 1: rows (registers, loads before the K loop) 1.123x vs "
                 "dot (tensor-core dots after it) 1.144x",
        ratio="0.982",
        source="eval/results/archive/adapters/dense_slots_rows_expand.md",
    ),
    Tuned(
        what="expansion groups spread over the K splits, unrolled up to UNROLLED_GROUPS dots "
             "and UNROLLED_BYTES of operands per program, a loop beyond",
        default="192 KiB",
        measured="spreading: switch decode 1.134x -> 1.125x at batch 1, 1.315x -> 1.261x at "
                 "batch 8 (archive/adapters/expand_placement_b1-8.md); 4 unrolled dense groups "
                 "of split float32 xa, 384 KiB, failed to compile at 7B, E 128, batch 64; 4 groups of "
                 "bf16 xa, 192 KiB (q/k/v at E 32, batch 64), compiled and ran",
        ratio="0.992 at batch 1, 0.959 at batch 8; the cap: compiles vs not",
        source="eval/results/suite/7b_e128_b64.md",
    ),
    Tuned(
        what="switch adapter decode strategy (GenerateConfig.switch_strategy)",
        default="fused",
        measured="record run, batch 1: switch-fused 1.131x, switch-merge 2.751x the backbone "
                 "(routes change every step; merge serves batch 1 only)",
        ratio="fused/merge 0.411",
        source="eval/results/adapters/llama2-7b_e8_r16_ctx1024.md",
    ),
    Tuned(
        what="SGMM merge kernel blocks (switch_merge.default_block_sizes heuristic: 128 columns "
             "x 64-row steps, split_k towards 512 programs)",
        default="heuristic",
        measured="merge alone at 7B: 10.31-10.67 ms, 0.99-1.03 of copy bandwidth over six runs "
                 "(10.44 ms, 1.01 in the record run)",
        ratio="1.01 of copy bandwidth",
        source="eval/results/adapters/llama2-7b_e8_r16_ctx1024.md",
    ),
    Tuned(
        what="jnp LoRA product (adapters.lora_method): gather if tokens * k < E, else dense",
        default="gather | dense",
        measured="grouped (ragged_dot), removed: the gpu train step at E 32 needed 95.4 GiB of "
                 "temporaries against 21.5 GiB dense, did not compile at E 128; on a 2-core CPU "
                 "8x slower than dense at E 32",
        ratio="dense/grouped memory 0.23",
        source="no result file: the gpu accuracy preset's compile (commit e882de5)",
    ),
    Tuned(
        what="stacked_matmul blocks (stacked_matmul._TUNED), Llama-2-7B (K, N)",
        default="(4096,4096) n128 k128 s4; (11008,4096) n64 k64 s4; (4096,11008) n64 k128 s1",
        measured="(4096,4096): top blocks within noise, this one steady at 19.0-20.3 us (XLA's "
                 "own dot, no loop: 16.7 us); (11008,4096): 38.3-41.6 us vs 47.4 us for the old "
                 "heuristic n64 k256 s1; (4096,11008): 39.8 us",
        ratio="(11008,4096) 0.81-0.88 of the heuristic's time; 0.80-0.83 of copy bandwidth",
        source="eval/results/kernels/sweep_{loop,unrolled}.md, "
               "eval/results/archive/kernels/stacked_matmul_blocks.txt",
    ),
    Tuned(
        what="fused_projections blocks (_TUNED_QKV, _TUNED_GATE_UP), Llama-2-7B",
        default="qkv (4096,4096,4096) n128 k128 s1; gate_up (4096,11008) n128 k128 s1",
        measured="qkv: 42.9-43.5 us vs 48.2 us for three stacked_matmul calls (XLA's three dots "
                 "unrolled, no loop: 43.2 us); gate_up: 68.7-70.6 us vs 76.2 us for two "
                 "stacked_matmul calls and SiLU, split_k 2: 75.6 us",
        ratio="qkv 0.89-0.90, gate_up 0.90-0.93 of the separate calls' time",
        source="eval/results/kernels/sweep_{loop,unrolled}.md",
    ),
    Tuned(
        what="shared-memory estimate (_blocks.shared_memory_bytes; defaults shrunk to fit 227 KiB)",
        default="copies * itemsize * block_k * sum(block_m + widths)",
        measured="exact for gate/up at 64 rows, n128 k128 st3 (245760 B, Triton's request) "
                 "and for the removed inline q/k/v kernel, 16 rows, two rank-16 slots (270336 "
                 "B); q/k/v at 16 rows n128 k128 st3 (221184 B) and the q/k/v shrink (k512, "
                 "r16) compiled and ran, q/k/v n64 k256 (245760 B) did not",
        ratio="fits vs not",
        source="eval/results/suite/ (batch 64 decode failures before the fit)",
    ),
    Tuned(
        what="kernel backend of the projections: Pallas Triton (stacked_matmul, deprecated since "
             "JAX 0.11) or Pallas Mosaic GPU (mosaic_matmul, not wired into ops yet)",
        default="triton",
        measured="one projection alone, 8 layers chained, us per call Triton / Mosaic (best "
                 "blocks): 4096x4096 M 1 42.3 / 28.4, M 8 25.1 / 28.7, M 32 26.2 / 36.3, M 64 "
                 "32.5 / 30.9; 4096x11008 M 1 94.8 / 46.1, M 8 62.6 / 50.7, M 32 49.9 / 63.9, "
                 "M 64 49.0 / 72.4; 11008x4096 M 1 50.8 / 54.4, M 8-64 48.8-52.9 / 47.6-58.3",
        ratio="Mosaic/Triton 0.49-0.67 at M 1 (4096 inputs), 1.07 (11008), 0.81-1.48 at M 8-64; "
              "not yet measured inside the decode step, where the fused Triton kernels run",
        source="eval/results/kernels/mosaic_check.md",
        gpu="NVIDIA H200",
        date="2026-12-05",
    ),
    Tuned(
        what="shrink-ahead (ops.Impl.shrink_ahead, gather slots at decode): o's x A from the "
             "decode-attention kernel, gate's and up's from o's routed kernel (which adds the "
             "residual), the next layer's q/k/v from down's; 256 -> 161 Triton launches per "
             "7B batch-1 step. o and down then run unsplit in narrower column blocks (o n32 k128 "
             "s1, down n16 k64 s1, the same program counts as their split-K defaults)",
        default="off",
        measured="not yet timed: built 2026-12-05 when no GPU was lent; checked in interpret "
                 "mode and lowered for an abstract H200 only. To decide: eval/bench/adapters.py "
                 "--only mode=switch-fused,switch-ahead (same run), and eval/bench/profile.py "
                 "for what the narrow o and down tiles cost",
        ratio="none yet",
        source="tests/test_shrink_ahead.py",
        gpu="none",
        date="2026-12-05",
    ),
)
