"""The ``loraswitch`` command line.

``loraswitch demo`` runs the whole pipeline offline on a bundled real-text sample: a tiny Llama
pretrained briefly, a single LoRA, a per-layer MoE-LoRA and a LoRA-Switch adapter fine-tuned with
equal parameter budgets, scored (held-out loss, multiple-choice accuracy), a report with plots.
``loraswitch generate`` runs a Hugging Face Llama folder (``--model DIR``) or, without one, a small
random-weight demo model that needs no download. ``loraswitch train`` trains adapters from a JSON config (default: a demo run on bundled data).
``loraswitch init`` writes a random model folder
of any preset (config.json, safetensors, tokenizer.json) for trying the rest offline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from loraswitch_jax.config import PRESETS, LlamaConfig
from loraswitch_jax.generate import PAD, GenerateConfig, generate_batch, prepare_prompts
from loraswitch_jax.params import LlamaParams, init_params
from loraswitch_jax.sampling import Sampler
from loraswitch_jax.tokenizer import Tokenizer, byte_tokenizer
from loraswitch_jax.weights import load_params, save_params

__all__ = ["main"]

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def _demo_model(dtype) -> tuple[LlamaParams, LlamaConfig, Tokenizer]:
    cfg = PRESETS["demo"]
    return init_params(cfg, jax.random.key(0), dtype), cfg, byte_tokenizer()


class _TextStream:
    """Prints a single sequence's text as tokens arrive (a host callback per step)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, step, tokens):
        if tokens[0] == PAD:
            return
        self.ids.append(int(tokens[0]))
        # Hold back an incomplete multi-byte character until its last byte arrives.
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        if text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def _generate_command(args) -> int:
    dtype = _DTYPES[args.dtype]
    t0 = time.perf_counter()
    if args.model:
        params, cfg = load_params(args.model, dtype=dtype)
        tokenizer = Tokenizer.from_pretrained(args.model)
        source = args.model
    else:
        params, cfg, tokenizer = _demo_model(dtype)
        source = "random-weight demo model (no --model given)"
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    print(f"model: {source}  ({cfg.num_params() / 1e6:.2f}M parameters, {args.dtype}, "
          f"{jax.devices()[0].device_kind}) loaded in {load_s:.2f}s", flush=True)

    prompts = args.prompt or ["Once upon a time"]
    ids = [tokenizer.encode(p) for p in prompts]
    gen = GenerateConfig(
        max_new_tokens=args.max_new_tokens,
        sampler=Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p),
        stop_tokens=None if not args.ignore_eos else (),
        mesh=args.mesh,
    )
    if gen.mesh is not None:  # KV heads replicated where needed, weights split over the mesh
        from loraswitch_jax.parallel import place

        params, _ = place(params, None, cfg, gen.mesh)
    tokens, lengths, cache_len = prepare_prompts(ids, cfg, gen.max_new_tokens, gen.cache_len)
    stream = _TextStream(tokenizer) if len(prompts) == 1 and not args.no_stream else None
    call_args = (params, None, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(args.seed))
    static = dict(cfg=cfg, gen=gen, cache_len=cache_len, stream=stream)

    t0 = time.perf_counter()
    compiled = generate_batch.lower(*call_args, **static).compile()
    compile_s = time.perf_counter() - t0
    if stream:
        print(f"\n--- {prompts[0]}", end="", flush=True)
    t0 = time.perf_counter()
    out = np.asarray(compiled(*call_args))
    run_s = time.perf_counter() - t0

    stop = set(cfg.eos_token_id) if gen.stop_tokens is None else set(gen.stop_tokens)
    n_generated = 0
    for i, (prompt, row) in enumerate(zip(prompts, out)):
        row = [int(t) for t in row if t != PAD]
        n_generated += len(row)
        if not stream:
            print(f"\n--- [{i}] {prompt}{tokenizer.decode([t for t in row if t not in stop])}")
    print()
    prompt_tokens = int(lengths.sum())
    print(f"compile {compile_s:.2f}s | {len(prompts)} prompt(s), {prompt_tokens} prompt tokens, "
          f"{n_generated} new tokens in {run_s:.3f}s = {n_generated / run_s:.1f} tokens/s"
          f"{' (streaming: one host callback per token)' if stream else ''}")
    return 0


def _init_command(args) -> int:
    cfg = PRESETS[args.preset]
    params = init_params(cfg, jax.random.key(args.seed), _DTYPES[args.dtype])
    save_params(params, cfg, args.out)
    if args.preset == "demo":
        byte_tokenizer().save(args.out)
    print(f"wrote a random {args.preset} model ({cfg.num_params() / 1e6:.2f}M parameters) to {args.out}")
    return 0


def _train_command(args) -> int:
    from loraswitch_jax.train.config import load_train_config, to_dict
    from loraswitch_jax.train.loop import train

    tc = load_train_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(to_dict(tc), indent=2))
        return 0
    print(f"training a {tc.adapter.mode} adapter on {tc.model} with {tc.data.path} -> {tc.out_dir}")
    try:
        summary = train(tc)
    except KeyboardInterrupt as e:  # train's message names the checkpoint a rerun resumes from
        print(f"loraswitch: {e or 'interrupted'}", file=sys.stderr)
        return 130
    last = summary["last"]
    print(f"done: {summary['steps']} steps in {summary['seconds']:.1f}s; last loss {last.get('loss', float('nan')):.4f}"
          + (f", held-out loss {last['eval_loss']:.4f}" if last.get("eval_loss") is not None else "")
          + f"; adapter in {tc.out_dir}/adapter")
    return 0


def _demo_command(args) -> int:
    from loraswitch_jax.eval.accuracy.experiment import demo

    demo(args.out, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraswitch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the whole pipeline on the bundled sample (a few minutes on "
                       "a CPU): pretrain, fine-tune three adapter kinds, evaluate, report")
    d.add_argument("--out", default="runs/demo-pipeline", help="report folder")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo_command)

    g = sub.add_parser("generate", help="generate text with a Llama model")
    g.add_argument("--model", help="Hugging Face Llama folder (config.json, safetensors, "
                   "tokenizer.json); default: a random-weight demo model")
    g.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    g.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens")
    g.add_argument("--no-stream", action="store_true", help="print at the end (pure device loop)")
    g.add_argument("--mesh", help="run over many devices, e.g. data=2,tensor=4 (axes data, fsdp, "
                   "tensor; default: one device)")
    g.set_defaults(func=_generate_command)

    t = sub.add_parser("train", help="train adapters (resumes from the output folder's checkpoints)")
    t.add_argument("--config", help="JSON training config; default: the demo run on bundled data")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. optim.lr=1e-3 adapter.num_experts=8 out_dir=runs/x")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=_train_command)

    i = sub.add_parser("init", help="write a random-weight model folder of a preset")
    i.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    i.add_argument("--out", required=True)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    i.set_defaults(func=_init_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # our errors name the problem: no traceback
        print(f"loraswitch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
