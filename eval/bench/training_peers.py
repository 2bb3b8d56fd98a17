"""The PyTorch peer of the training benchmark: a MixLoRA training step at the same setting.

Hugging Face ``LlamaForCausalLM`` with random bf16 weights of the benchmark's preset on CUDA,
MixLoRA 0.2.3 injected as :mod:`.peers` does for decode (LoRA r16 on q k v o, a top-2 of 8 LoRA
experts r16 on gate up down per layer, ``act_fn="silu"``), its dropout set to 0 (ours trains
without dropout), the backbone frozen, ``torch.optim.AdamW`` on the adapter weights and routers
(bf16, MixLoRA's own dtype) with global-norm clipping at 1 as ours. One step: forward with
``labels`` (the model's own shifted cross-entropy), backward, clip, AdamW, zero the gradients.
Remat ``none`` runs plain; ``full`` turns on Hugging Face gradient checkpointing (each decoder
layer recomputed in the backward, as our ``full``). Timed as ours (median of synchronised steps
after warmup); memory is ``torch.cuda.max_memory_allocated`` of the process (and reserved).

The model FLOPs are ours at the same shapes (see :mod:`.training`): MixLoRA recomputes the frozen
``down`` projection once per routed expert, work the model does not need, which is not counted.
Run from :mod:`.training` as ``mixlora:none:1`` or ``mixlora:full:max``; a missing ``mixlora``
package is a skipped row (carry its wheel: ``python -m loraswitch_jax.eval.bench.peers
--download-wheels wheels`` here, ``pip install --no-deps wheels/*.whl`` there).
"""

from __future__ import annotations

import json
import time

from loraswitch_jax.eval.bench.adapter_cases import ALPHA, BASE_EXPERTS, BASE_TOP_K, RANK
from loraswitch_jax.eval.bench.harness import log
from loraswitch_jax.params import PROJECTIONS, projection_shape

__all__ = ["mixlora_active_params", "mixlora_trainables", "peer_batch", "work_mixlora"]


def mixlora_active_params(cfg) -> int:
    """Adapter weights a token uses: LoRA on q k v o, k of E experts on gate up down, a gate."""
    per_layer = sum(RANK * sum(projection_shape(cfg, p))
                    * (BASE_TOP_K if p in ("gate", "up", "down") else 1) for p in PROJECTIONS)
    return cfg.num_hidden_layers * (per_layer + cfg.hidden_size * BASE_EXPERTS)


def peer_batch(run, rows: list[dict], ours: str | None) -> tuple[int, None, str]:
    """The batch of ``mixlora:...:max``: our confirmed largest batch in ``rows`` or the report
    ``ours`` (the same remat first); ``(0, None, why)`` when there is none."""
    if ours:
        with open(ours) as f:
            rows = rows + json.load(f)["results"]
    confirmed = [r for r in rows if r.get("confirmed_batch") and r["run"]["adapter"] != "mixlora"]
    same = [r for r in confirmed if r["run"]["remat"] == run.remat] or confirmed
    if not same:
        return 0, None, "no confirmed largest batch of ours to match"
    return max(r["confirmed_batch"] for r in same), None, ""


def _lora_layers(model) -> list:
    """Every MixLoRA ``LoraLinear``: the attention ones (modules of the model) and the experts
    (kept in a plain dict beside the model, out of reach of ``model.modules()``)."""
    found = []
    for layer in model.model.layers:
        found += [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
                  if hasattr(getattr(layer.self_attn, n), "lora_A")]
        for moe in layer.mlp.mixlora_moes.values():
            found += list(moe.experts_.values())
    return found


def mixlora_trainables(model) -> list:
    """Freeze the backbone; return the adapter's tensors (LoRA ``A``, ``B`` and the routers'
    gates) with gradients on and the LoRA dropout set to 0."""
    for p in model.parameters():
        p.requires_grad_(False)
    tensors = []
    for lora in _lora_layers(model):
        lora.dropout_.p = 0.0
        tensors += [lora.lora_A.weight, lora.lora_B.weight]
    for layer in model.model.layers:
        tensors += [moe.gate_ for moe in layer.mlp.mixlora_moes.values()]
    for t in tensors:
        t.requires_grad_(True)
    return tensors


def work_mixlora(job: dict, row: dict) -> None:
    """One MixLoRA training run of ``job`` (see :func:`.training.work`); fills ``row``."""
    from loraswitch_jax.eval.bench import peers
    from loraswitch_jax.eval.bench.training import Run, model_config, timed_row

    bench, run = job["bench"], Run(**job["run"])
    device = peers.torch_device()
    row["environment"] = peers.torch_environment(device)
    reason = peers.skip_reason("mixlora", device)
    if reason:
        row |= {"status": "skipped", "error": reason}
        return
    import torch

    cfg, seq, batch = model_config(bench["preset"]), bench["seq"], job["batch"]
    t0 = time.perf_counter()
    model = peers.build_model(cfg, device, bench["seed"])
    # dropout > 0 is MixLoRA's assertion; mixlora_trainables sets it to 0 after.
    model = peers.add_mixlora(model, cfg, device, rank=RANK, alpha=int(ALPHA),
                              experts=BASE_EXPERTS, top_k=BASE_TOP_K, dropout=0.05)
    trainable = mixlora_trainables(model)
    if run.remat == "full":
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(bench["seed"])
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    row |= {"batch": batch, "build_s": time.perf_counter() - t0,
            "trainable_params": sum(t.numel() for t in trainable),
            "checkpointing": run.remat == "full"}
    log(f"{run.name}: model built in {row['build_s']:.1f}s, batch {batch}")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times, loss = [], None
    for i in range(bench["warmup"] + bench["steps"]):
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        loss = out.loss.detach().float().item()
        del out
        if i >= bench["warmup"]:
            times.append(time.perf_counter() - t0)
    row |= timed_row(times, bench, run, batch) | {
            "loss": loss,
            "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
            "reserved_bytes": torch.cuda.max_memory_reserved() if device == "cuda" else None}
