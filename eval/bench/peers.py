"""Decode latency of what users would pick instead, on the same GPU (DESIGN.md §2, §5).

Hugging Face ``transformers`` ``LlamaForCausalLM`` with random bf16 weights of one of our presets
(Llama-2-7B shapes by default), one prompt of ``--context`` random tokens, greedy decoding:

  eager      ``generate`` with the default dynamic cache, no compilation
  compiled   a static cache + ``torch.compile`` in its default mode (``generate``'s own
             auto-compile; its default "reduce-overhead" mode breaks on this cache)
  peft-lora  ``peft`` LoRA, rank 16, alpha 32, on the seven projections, unmerged, eager
  mixlora    MixLoRA (``mixlora`` 0.2.3): LoRA on the attention projections, a top-2 of 8 LoRA
             experts on the MLP projections per layer, rank 16, ``act_fn="silu"``; eager

Each is timed as :mod:`.adapters` times ours: a generation of 1 new token
and one of N, interleaved; ``(median(T_N) - median(T_1)) / (N - 1)`` is one decode step. LoRA
``B`` matrices are filled with small random values (no path may skip a zero adapter). A peer whose
package is missing is skipped with the reason; ``--ours FILE`` adds the batch-1 rows of a
JSON of :mod:`.adapters` to the table. Writes JSON, Markdown and a PNG after every peer.

On the GPU machine (no network) ``mixlora`` travels as a wheel::

    python -m loraswitch_jax.eval.bench.peers --download-wheels wheels  # here, with network
    pip install --no-deps wheels/*.whl                                  # there
    python -m loraswitch_jax.eval.bench.peers --out eval/results/peers \\
        --ours eval/results/adapters/llama2-7b_e8_r16_ctx1024.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

from loraswitch_jax.config import PRESETS, LlamaConfig
from loraswitch_jax.eval.bench.harness import log, write_report  # jax, no device use

__all__ = ["PEERS", "PeersConfig", "add_mixlora", "build_model", "download_wheels", "main",
           "ours_rows", "parse_args", "skip_reason", "torch_device", "torch_environment"]

PEERS = ("eager", "compiled", "peft-lora", "mixlora")
REQUIRES = {
    "eager": ("torch", "transformers"),
    "compiled": ("torch", "transformers"),
    "peft-lora": ("torch", "transformers", "peft"),
    "mixlora": ("torch", "transformers", "mixlora"),
}
SYSTEM = {"eager": "transformers", "compiled": "transformers", "peft-lora": "peft",
          "mixlora": "mixlora"}
DESCRIPTION = {
    "eager": "transformers eager, dynamic cache",
    "compiled": "transformers static cache + torch.compile (default mode)",
    "peft-lora": "peft LoRA r16 on 7 projections, unmerged",
    "mixlora": "MixLoRA 0.2.3, per-layer top-2 of 8 experts, r16",
}
MIXLORA_VERSION = "0.2.3"
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
B_STD = 1e-3

@dataclasses.dataclass(frozen=True)
class PeersConfig:
    """What to run. ``dropout`` is MixLoRA's ``lora_dropout`` (it must be > 0; off at eval)."""

    preset: str = "llama2-7b"
    peers: tuple[str, ...] = PEERS
    context: int = 1024
    new_tokens: int = 33
    reps: int = 3
    rank: int = 16
    alpha: int = 32
    experts: int = 8
    top_k: int = 2
    dropout: float = 0.05
    ours: str | None = None
    seed: int = 0
    out: str = "eval/results/peers"

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        unknown = sorted(set(self.peers) - set(PEERS))
        if unknown:
            raise ValueError(f"unknown peers {unknown}; choose from {PEERS}")
        if self.new_tokens < 2 or self.reps < 1 or self.context < 1:
            raise ValueError(f"need new_tokens >= 2, reps >= 1, context >= 1: {self}")
        if not self.dropout > 0:
            raise ValueError(f"mixlora asserts lora_dropout > 0, got {self.dropout=}")


def skip_reason(peer: str, device: str) -> str | None:
    """Why ``peer`` cannot run here (a missing package, or no GPU for compilation), or None."""
    missing = [m for m in REQUIRES[peer] if importlib.util.find_spec(m) is None]
    if missing:
        hint = ("; carry the wheel (--download-wheels DIR) and pip install --no-deps it"
                if "mixlora" in missing else "")
        return f"package {', '.join(missing)} is not installed{hint}"
    if peer == "compiled" and device != "cuda":
        # generate() auto-compiles only on an accelerator; on a CPU it would silently run eager.
        return "generate() compiles its forward pass on a GPU only"
    return None


# ------------------------------------------------------------------------------------ models
def build_model(cfg: LlamaConfig, device: str, seed: int):
    """``LlamaForCausalLM`` with random bf16 weights, created on ``device``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_dict())
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    return model.eval()


def add_peft_lora(model, pc: PeersConfig):
    """The model wrapped by ``peft`` with a LoRA on the seven projections (unmerged)."""
    import peft
    import torch

    config = peft.LoraConfig(r=pc.rank, lora_alpha=pc.alpha, lora_dropout=0.0,
                             target_modules=list(HF_TARGETS), bias="none")
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, B_STD)
    return model.eval()


def _projection_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    """``(in, out)`` per Hugging Face projection name."""
    d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def add_mixlora(model, cfg: LlamaConfig, device: str, *, rank: int, alpha: int, experts: int,
                top_k: int, dropout: float):
    """MixLoRA injected with random weights, through its own loader's entry point; in eval mode
    (the experts' dropout too). ``dropout`` is its ``lora_dropout`` (MixLoRA needs it > 0).

    Keys and shapes follow ``mixlora.model._inject_attn_module`` / ``_inject_mlp_module``:
    ``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``, ``moe_gate.weight [E, d]``.
    """
    import mixlora
    import torch

    config = mixlora.MixLoraConfig.from_config({
        "base_model_name_or_path": "random", "task_type": "CAUSAL_LM", "peft_type": "MIXLORA",
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": list(HF_TARGETS), "routing_strategy": "mixlora",
        "num_experts": experts, "top_k": top_k, "act_fn": "silu",
    })
    config.adapter_name_ = "default"
    config.dtype_ = torch.bfloat16
    config.check()

    def lora(prefix, d_in, d_out):
        a = torch.randn(rank, d_in, device=device) / math.sqrt(d_in)
        b = torch.randn(d_out, rank, device=device) * B_STD
        return {f"{prefix}.lora_A.weight": a.to(torch.bfloat16),
                f"{prefix}.lora_B.weight": b.to(torch.bfloat16)}

    weights = {}
    for i in range(cfg.num_hidden_layers):
        for name, (d_in, d_out) in _projection_shapes(cfg).items():
            if name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                weights |= lora(f"mixlora.layers.{i}.self_attn.{name}", d_in, d_out)
            else:
                for e in range(experts):
                    weights |= lora(f"mixlora.layers.{i}.mlp.{name}.experts.{e}", d_in, d_out)
        gate = torch.randn(experts, cfg.hidden_size, device=device) * 0.02
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = gate.to(torch.bfloat16)
    mixlora.inject_adapter_in_model(model, config, weights)
    model.eval()
    # The experts sit in a plain dict, out of reach of eval(): switch their dropout off by hand,
    # so the peer is timed as inference would run, not with a training-time dropout.
    for layer in model.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    return model


# ------------------------------------------------------------------------------------ timing
def time_generate(model, ids, pc: PeersConfig, device: str, warmup: int, **kwargs) -> dict:
    """``generate`` of 1 and of N new tokens, interleaved; one decode step from the difference."""
    import torch

    n = pc.new_tokens

    def run(new: int) -> float:
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if out.shape[1] != ids.shape[1] + new:
            raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, not {new}")
        return elapsed

    with torch.no_grad():
        for _ in range(warmup):  # the compiled peer compiles here
            run(1)
            run(n)
        times = {1: [], n: []}
        for _ in range(pc.reps):
            for m in (1, n):
                times[m].append(run(m))
    med = {m: 1e3 * statistics.median(ts) for m, ts in times.items()}
    step = (med[n] - med[1]) / (n - 1)
    return {"ms_per_token": step, "tokens_per_s": 1e3 / step if step > 0 else None,
            "prefill_ms": med[1], "run_ms": {m: [1e3 * t for t in ts] for m, ts in times.items()}}


def bench_peer(peer: str, pc: PeersConfig, device: str) -> dict:
    """Build the peer on a fresh model, time it, free it."""
    import torch
    import transformers

    cfg = PRESETS[pc.preset]
    model = build_model(cfg, device, pc.seed)
    kwargs, warmup = {"disable_compile": True}, 1
    if peer == "compiled":
        kwargs = {"cache_implementation": "static",
                  "compile_config": transformers.CompileConfig(mode="default")}
        warmup = 2  # the first decode compiles; a second pass catches a recompilation
    elif peer == "peft-lora":
        model = add_peft_lora(model, pc)
    elif peer == "mixlora":
        model = add_mixlora(model, cfg, device, rank=pc.rank, alpha=pc.alpha, experts=pc.experts,
                            top_k=pc.top_k, dropout=pc.dropout)
    g = torch.Generator().manual_seed(pc.seed)
    ids = torch.randint(0, cfg.vocab_size, (1, pc.context), generator=g).to(device)
    try:
        return time_generate(model, ids, pc, device, warmup, **kwargs)
    finally:
        del model
        gc.collect()
        if peer == "compiled":
            torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ report
def ours_rows(path: str, preset: str, context: int) -> list[dict]:
    """Batch-1 rows of an adapter-benchmark JSON at ``preset`` and ``context`` (E 8, k 2)."""
    with open(path) as f:
        report = json.load(f)
    device = report["environment"]["device_kind"]
    return [
        {"system": "loraswitch-jax", "variant": r["mode"], "ms_per_token": r["ms_per_token"],
         "prefill_ms": r.get("prefill_ms"), "device": device, "source": path}
        for r in report["results"]
        if r["batch"] == 1 and r["preset"] == preset and r["context"] == context
        and (r["experts"], r["top_k"]) == (8, 2) and "ms_per_token" in r
    ]


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    """One table: peers of this run, then ours, ms/token and the ratio to transformers eager."""
    env, args = report["environment"], report["args"]
    eager = next((r["ms_per_token"] for r in report["results"]
                  if r["variant"] == "eager" and "ms_per_token" in r), None)
    lines = [
        f"Decode peers, `{args['preset']}` random bf16 weights, batch 1, prompt {args['context']}, "
        f"1 vs {args['new_tokens']} new tokens, median of {args['reps']}: {env['device']}, "
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"mixlora {env['mixlora']}; {env['date'][:10]}.",
    ]
    if args["ours"]:
        lines.append(f"loraswitch-jax rows from `{args['ours']}` (another process; its device is "
                     f"in the table)." if report["ours"] else
                     f"`{args['ours']}` has no batch-1 rows at this preset and context.")
    lines += ["", "| system | variant | ms/token | x transformers eager | prefill ms | device "
              "| note |", "|---|---|---:|---:|---:|---|---|"]
    for r in report["results"] + report["ours"]:
        ms = r.get("ms_per_token")
        ratio = ms / eager if ms is not None and eager else None
        lines.append(
            f"| {r['system']} | {r['variant']} | {_f(ms, '.2f')} | {_f(ratio, '.2f')} "
            f"| {_f(r.get('prefill_ms'), '.1f')} | {r.get('device', env['device'])} "
            f"| {r.get('skipped') or r.get('error') or r.get('description', '')} |")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """ms/token per system, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] + report["ours"]
            if r.get("ms_per_token") is not None and r["ms_per_token"] > 0]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    labels = [f"{r['system']}: {r['variant']}" for r in rows]
    colors = ["tab:orange" if r["system"] == "loraswitch-jax" else "tab:blue" for r in rows]
    ax.barh(range(len(rows)), [r["ms_per_token"] for r in rows], color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    if rows:
        ax.set_xscale("log")
    ax.set(xlabel="ms per decode step (batch 1)",
           title=f"{report['args']['preset']}, prompt {report['args']['context']}; "
                 f"{report['environment']['device']}")
    ax.title.set_fontsize(9)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, folder: str) -> str:
    """JSON, Markdown and PNG under ``folder``; returns the Markdown."""
    args = report["args"]
    return write_report(report, os.path.join(folder, f"{args['preset']}_ctx{args['context']}"),
                        markdown, plot)


# -------------------------------------------------------------------------------------- main
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_device() -> str:
    """``"cuda"`` when torch sees a GPU; ``"cpu"`` otherwise (also without torch: then every
    peer is skipped for its missing package, and the report still gets written)."""
    if importlib.util.find_spec("torch") is None:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_environment(device: str) -> dict:
    """The torch device's name, the peers' package versions and the date."""
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or "cpu"
    return {
        "device": name,
        **{p: _version(p) for p in ("torch", "transformers", "peft", "mixlora")},
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(pc: PeersConfig) -> dict:
    """Time every peer (skipping those that cannot run), write and print the report."""
    device = torch_device()
    env = torch_environment(device)
    log(f"{env['device']}; {pc}")
    report = {"args": dataclasses.asdict(pc), "environment": env, "results": [],
              "ours": ours_rows(pc.ours, pc.preset, pc.context) if pc.ours else []}
    for peer in pc.peers:
        row = {"system": SYSTEM[peer], "variant": peer, "description": DESCRIPTION[peer]}
        reason = skip_reason(peer, device)
        if reason:
            row["skipped"] = reason
            log(f"{peer}: skipped, {reason}")
        else:
            log(f"{peer}: {DESCRIPTION[peer]}")
            t0 = time.perf_counter()
            try:
                row |= bench_peer(peer, pc, device)
                log(f"{peer}: {row['ms_per_token']:.2f} ms/token")
            except Exception as e:  # noqa: BLE001 - one peer's failure must not end the run
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}".splitlines()[0]
            row["wall_s"] = time.perf_counter() - t0
        report["results"].append(row)
        write_outputs(report, pc.out)
    table = write_outputs(report, pc.out)
    log(f"wrote {pc.out}/{pc.preset}_ctx{pc.context}.json, .md, .png")
    print(table, flush=True)
    return report


def download_wheels(folder: str) -> None:
    """``pip download mixlora==0.2.3 --no-deps -d folder`` (pure Python, any platform)."""
    subprocess.run([sys.executable, "-m", "pip", "download", f"mixlora=={MIXLORA_VERSION}",
                    "--no-deps", "-d", folder], check=True)


def parse_args(argv: list[str] | None = None) -> tuple[PeersConfig, str | None]:
    """The run's config and the ``--download-wheels`` folder (None: run the peers)."""
    d = PeersConfig()
    p = argparse.ArgumentParser(
        prog="python -m loraswitch_jax.eval.bench.peers",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default=d.preset, choices=sorted(PRESETS))
    p.add_argument("--peers", nargs="+", default=list(d.peers), choices=PEERS)
    p.add_argument("--context", type=int, default=d.context, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens,
                   help="N: decode = (T_N - T_1) / (N - 1)")
    p.add_argument("--reps", type=int, default=d.reps)
    p.add_argument("--ours", default=None, metavar="FILE",
                   help="an adapter-benchmark JSON whose batch-1 rows join the table")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="output folder")
    p.add_argument("--download-wheels", default=None, metavar="DIR",
                   help=f"only download the mixlora {MIXLORA_VERSION} wheel into DIR, then exit")
    a = p.parse_args(argv)
    config = PeersConfig(preset=a.preset, peers=tuple(a.peers), context=a.context,
                         new_tokens=a.new_tokens, reps=a.reps, ours=a.ours, seed=a.seed,
                         out=a.out)
    return config, a.download_wheels


if __name__ == "__main__":
    config, wheels = parse_args(sys.argv[1:])
    if wheels:
        download_wheels(wheels)
    else:
        main(config)
