"""The ``loraswitch`` command line: demo, generate, train, init, plan.

Errors a user can cause (a bad flag value, a missing or unreadable file, a path under a file, an
output folder of another run) print one line, ``loraswitch: error: ...``, and exit with status 2;
Ctrl-C prints one line and exits with 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from loraswitch_jax.adapter_io import load_adapter
from loraswitch_jax.adapters import Adapter
from loraswitch_jax.config import PRESETS, LlamaConfig
from loraswitch_jax.generate import PAD, GenerateConfig, generate_batch, prepare_prompts
from loraswitch_jax.params import LlamaParams, init_params
from loraswitch_jax.sampling import Sampler
from loraswitch_jax.switch import STRATEGIES, resolve_strategy
from loraswitch_jax.tokenizer import Tokenizer, byte_tokenizer
from loraswitch_jax.weights import load_params, save_params

__all__ = ["main"]

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
# Measured on a 2-core CPU (107 s and 38 s of CPU time); shown in --help and the README.
DEMO_TIME = "about a minute on a 2-core CPU"
TRAIN_TIME = "about 40 s on a CPU"


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


def _load_model(args, dtype) -> tuple[LlamaParams, LlamaConfig, Tokenizer, str]:
    """The ``--model`` folder (or the demo model), its tokenizer checked before any weight loads."""
    if not args.model:
        params, cfg, tokenizer = _demo_model(dtype)
        return params, cfg, tokenizer, "random-weight demo model (no --model given)"
    cfg = LlamaConfig.from_pretrained(args.model)  # reads config.json only
    if not os.path.isfile(os.path.join(args.model, "tokenizer.json")):
        raise FileNotFoundError(
            f"no tokenizer.json in {args.model!r}: copy the tokenizer.json of the model these "
            "weights come from into that folder (`loraswitch init` writes one only for presets "
            "with the byte vocabulary, e.g. --preset demo)")
    tokenizer = Tokenizer.from_pretrained(args.model)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{os.path.join(args.model, 'tokenizer.json')} has {tokenizer.vocab_size} tokens but "
            f"the model's vocab_size is {cfg.vocab_size}: the tokenizer is not this model's")
    params, cfg = load_params(args.model, cfg, dtype=dtype)
    return params, cfg, tokenizer, args.model


def _load_adapter(args, cfg: LlamaConfig, batch_size: int) -> Adapter | None:
    """``--adapter`` loaded and checked against the model and ``--switch-strategy``."""
    if not args.adapter:
        if args.switch_strategy == "merge":
            raise ValueError("--switch-strategy merge needs a switch --adapter")
        return None
    adapter = load_adapter(args.adapter, cfg)
    if args.switch_strategy == "merge":
        if adapter.config.mode != "switch":
            raise ValueError(f"--switch-strategy merge applies to switch adapters; "
                             f"{args.adapter!r} holds a {adapter.config.mode!r} adapter")
        resolve_strategy("merge", batch_size)
    return adapter


def _generate_command(args) -> int:
    dtype = _DTYPES[args.dtype]
    t0 = time.perf_counter()
    params, cfg, tokenizer, source = _load_model(args, dtype)
    prompts = args.prompt or ["Once upon a time"]
    adapter = _load_adapter(args, cfg, len(prompts))
    jax.block_until_ready((params, adapter))
    load_s = time.perf_counter() - t0
    print(f"model: {source}  ({cfg.num_params() / 1e6:.2f}M parameters, {args.dtype}, "
          f"{jax.devices()[0].device_kind}) loaded in {load_s:.2f}s", flush=True)
    if adapter is not None:
        print(f"adapter: {args.adapter}  ({adapter.config.mode}, "
              f"{adapter.config.num_experts} expert(s) of rank {adapter.config.rank}"
              + (f", top-{adapter.config.top_k}, {args.switch_strategy}"
                 if adapter.config.mode == "switch" else "") + ")", flush=True)

    ids = [tokenizer.encode(p) for p in prompts]
    gen = GenerateConfig(
        max_new_tokens=args.max_new_tokens,
        sampler=Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p),
        stop_tokens=None if not args.ignore_eos else (),
        switch_strategy=args.switch_strategy,
        mesh=args.mesh,
    )
    if gen.mesh is not None:  # KV heads replicated where needed, weights split over the mesh
        from loraswitch_jax.parallel import place

        params, adapter = place(params, adapter, cfg, gen.mesh)
    tokens, lengths, cache_len = prepare_prompts(ids, cfg, gen.max_new_tokens, gen.cache_len)
    stream = _TextStream(tokenizer) if len(prompts) == 1 and not args.no_stream else None
    call_args = (params, adapter, jnp.asarray(tokens), jnp.asarray(lengths),
                 jax.random.key(args.seed))
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


def _byte_vocabulary(cfg: LlamaConfig) -> bool:
    """Whether ``cfg``'s ids are :func:`byte_tokenizer`'s (bytes, then ``<s>``, ``</s>``, pad)."""
    return cfg.vocab_size == 259 and cfg.bos_token_id == 256 and tuple(cfg.eos_token_id) == (257,)


def _init_command(args) -> int:
    cfg = PRESETS[args.preset]
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"--out {args.out!r} is a file, not a folder")
    params = init_params(cfg, jax.random.key(args.seed), _DTYPES[args.dtype])
    save_params(params, cfg, args.out)
    print(f"wrote a random {args.preset} model ({cfg.num_params() / 1e6:.2f}M parameters) "
          f"to {args.out}")
    if _byte_vocabulary(cfg):
        byte_tokenizer().save(args.out)
        print(f"with the byte tokenizer: loraswitch generate --model {args.out}")
    else:
        print(f"no tokenizer.json written: the {args.preset} preset's {cfg.vocab_size}-token "
              f"vocabulary needs its own; copy a real {args.preset} tokenizer.json into "
              f"{args.out} before `loraswitch generate --model {args.out}`")
    return 0


def _train_command(args) -> int:
    from loraswitch_jax.distributed import initialize
    from loraswitch_jax.train.config import load_train_config, to_dict
    from loraswitch_jax.train.loop import train

    tc = load_train_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(to_dict(tc), indent=2))
        return 0
    initialize(args.coordinator, args.num_processes, args.process_id)  # before any device use
    print(f"training a {tc.adapter.mode} adapter on {tc.model} with {tc.data.path} -> "
          f"{tc.out_dir}")
    try:
        summary = train(tc)
    except KeyboardInterrupt as e:  # train's message names the checkpoint a rerun resumes from
        print(f"loraswitch: {e or 'interrupted'}", file=sys.stderr)
        return 130
    if summary.get("already_finished"):
        return 0  # train() said so in one line and changed nothing
    last = summary["last"]
    print(f"done: {summary['steps']} steps in {summary['seconds']:.1f}s; last loss "
          f"{last.get('loss', float('nan')):.4f}"
          + (f", held-out loss {last['eval_loss']:.4f}" if last.get("eval_loss") is not None else "")
          + f"; adapter in {tc.out_dir}/adapter")
    return 0


def _flag_int(flag: str, text: str) -> int:
    """``text`` as a positive integer, or a one-line error naming ``flag``."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise ValueError(f"{flag} must be a positive integer, got {text!r}")
    return value


def _plan_command(args) -> int:
    from loraswitch_jax.planner import GPUS, PlanError, format_plan, plan, resolve_model
    from loraswitch_jax.sharding import MeshConfig, MeshError

    sizes = {flag: _flag_int(f"--{flag.replace('_', '-')}", getattr(args, flag))
             for flag in ("batch", "context", "new_tokens", "seq_len", "experts", "rank", "top_k")}
    for flag, value, allowed in (("--gpu", args.gpu, tuple(GPUS)),
                                 ("--remat", args.remat, ("none", "dots", "full")),
                                 ("--adapter", args.adapter, ("switch", "lora", "layerwise", "none")),
                                 ("--dtype", args.dtype, tuple(_DTYPES)),
                                 ("--attention-impl", args.attention_impl, ("xla", "cudnn"))):
        if value is not None and value not in allowed:
            raise ValueError(f"{flag} {value!r} is not one of {', '.join(allowed)}")
    try:
        cfg = resolve_model(args.model)
    except (PlanError, OSError) as e:
        raise ValueError(f"--model: {_one_line(e)}") from None
    try:
        mesh = MeshConfig.parse(args.mesh)
    except MeshError as e:
        raise ValueError(f"--mesh: {e}") from None
    loss_chunk = None if args.loss_chunk == "none" else _flag_int("--loss-chunk", args.loss_chunk)
    result = plan(cfg, mesh, train=args.train, remat=args.remat, adapter=args.adapter,
                  dtype=args.dtype, attention_impl=args.attention_impl, loss_chunk=loss_chunk,
                  **sizes)
    result = dataclasses.replace(result, model=args.model)
    print(format_plan(result, (args.gpu,) if args.gpu else tuple(GPUS)))
    if args.json:
        with open(args.json, "w") as f:
            f.write(result.to_json() + "\n")
    return 0


def _demo_command(args) -> int:
    from loraswitch_jax.eval.accuracy.experiment import demo

    demo(args.out, progress=not args.quiet)
    return 0


_EPILOG = f"""\
commands (times measured on a 2-core CPU, after the install):
  demo       the whole pipeline offline: pretrain a tiny Llama, fine-tune a LoRA,
             a per-layer MoE-LoRA and a LoRA-Switch adapter, score them, write a
             report, keep the models ({DEMO_TIME})
  generate   text from a Llama folder (--model) or the random demo model,
             optionally with an --adapter
  train      fine-tune an adapter from a JSON config (default: a demo run,
             {TRAIN_TIME})
  init       write a random model folder of a preset, to try the rest offline
  plan       per-device memory of a generate or train run on a mesh, from its
             compiled program on abstract shapes, and whether it fits a GPU

`loraswitch COMMAND --help` lists each command's flags."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraswitch", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Dynamic LoRA adapters (mixture of LoRA experts, LoRA-Switch) for Llama in "
                    "JAX: train, evaluate and generate.",
        epilog=_EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help=f"the whole pipeline on the bundled sample ({DEMO_TIME})",
                       description="Pretrain a tiny byte-level Llama on the bundled sample, "
                       "fine-tune a LoRA, a per-layer MoE-LoRA and a LoRA-Switch adapter with "
                       "equal budgets, score them, write a report with plots, and keep the "
                       f"backbone and adapters for `loraswitch generate` ({DEMO_TIME}).")
    d.add_argument("--out", default="runs/demo-pipeline",
                   help="output folder: report, plots, backbone/ and adapters/ "
                   "(default: %(default)s)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo_command)

    g = sub.add_parser("generate", help="generate text with a Llama model (and an adapter)",
                       description="Generate text with a Hugging Face Llama folder, or without "
                       "--model a random-weight demo model (no download), optionally with an "
                       "adapter saved by `loraswitch train` or `loraswitch demo`.")
    g.add_argument("--model", metavar="DIR", help="Hugging Face Llama folder (config.json, "
                   "safetensors, tokenizer.json); default: a random-weight demo model")
    g.add_argument("--adapter", metavar="DIR", help="an adapter folder (adapter_config.json, "
                   "adapter.safetensors) saved for this model")
    g.add_argument("--switch-strategy", choices=STRATEGIES, default="fused",
                   help="how a switch adapter is applied: fused (routed LoRA term inside the "
                   "projections, any batch) or merge (experts merged into the weights when the "
                   "route changes; one prompt) (default: %(default)s)")
    g.add_argument("--prompt", action="append", help="a prompt (repeat for a batch; default: "
                   "'Once upon a time')")
    g.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate per prompt (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    g.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16",
                   help="weights and activations (default: %(default)s)")
    g.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens")
    g.add_argument("--no-stream", action="store_true", help="print at the end (pure device loop)")
    g.add_argument("--mesh", help="run over many devices, e.g. data=2,tensor=4 (axes data, fsdp, "
                   "tensor; default: one device)")
    g.set_defaults(func=_generate_command)

    t = sub.add_parser("train", help="train adapters (resumes from the output folder's checkpoints)",
                       description="Fine-tune an adapter on a frozen Llama from a JSON config "
                       f"(default: a LoRA-Switch adapter on the demo model and bundled data, "
                       f"{TRAIN_TIME}). A run resumes from the latest checkpoint in its out_dir.")
    t.add_argument("--config", help="JSON training config; default: the demo run on bundled data")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. optim.lr=1e-3 adapter.num_experts=8 out_dir=runs/x")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address: join a multi-process run (or JAX_COORDINATOR_ADDRESS;"
                   " under srun or mpirun none is needed)")
    t.add_argument("--num-processes", type=int, metavar="N",
                   help="processes in the run (or JAX_NUM_PROCESSES)")
    t.add_argument("--process-id", type=int, metavar="I",
                   help="this process' index, 0..N-1 (or JAX_PROCESS_ID)")
    t.set_defaults(func=_train_command)

    i = sub.add_parser("init", help="write a random-weight model folder of a preset",
                       description="Write a random-weight Hugging Face Llama folder of a preset's "
                       "shape (config.json, safetensors; tokenizer.json for the byte-vocabulary "
                       "demo preset), to try the rest offline.")
    i.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                   help="model shape (default: %(default)s)")
    i.add_argument("--out", metavar="DIR", required=True, help="folder to write")
    i.add_argument("--seed", type=int, default=0, help="initialisation seed (default: %(default)s)")
    i.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16",
                   help="weight dtype (default: %(default)s)")
    i.set_defaults(func=_init_command)

    p = sub.add_parser("plan", help="per-device memory of a run, and whether it fits a GPU",
                       description="Compile a generate run (prefill, then the decode loop) or, "
                       "with --train, a train step on abstract shapes (nothing is allocated) and "
                       "print each device's bytes: weights, adapters, KV cache, optimizer state, "
                       "activations/temporaries and total, and whether they fit a GPU with "
                       "10% headroom. On CPU, bfloat16 dots and scatters compile to float32 "
                       "copies a GPU does not make: the temporaries are an upper bound there.")
    p.add_argument("--model", default="llama2-7b", help="a preset "
                   f"({', '.join(PRESETS)}) or a Hugging Face folder with config.json "
                   "(default: %(default)s)")
    p.add_argument("--mesh", default="", help="axis sizes, e.g. tensor=4 or data=2,fsdp=4 "
                   "(default: one device); a CPU with fewer devices compiles in a subprocess")
    p.add_argument("--batch", default="1", help="prompts, or rows per step (default: %(default)s)")
    p.add_argument("--context", default="4096",
                   help="inference: KV cache length, prompt plus new tokens (default: %(default)s)")
    p.add_argument("--new-tokens", default="128",
                   help="inference: tokens the decode loop generates (default: %(default)s)")
    p.add_argument("--train", action="store_true", help="plan a train step instead")
    p.add_argument("--seq-len", default="2048", help="training: tokens per row (default: %(default)s)")
    p.add_argument("--loss-chunk", default="none",
                   help="training: tokens per cross-entropy chunk, or none for whole logits "
                        "(default: %(default)s)")
    p.add_argument("--attention-impl", default="xla",
                   help="training: xla (blockwise) or cudnn (GPU; unpacked rows) "
                        "(default: %(default)s)")
    p.add_argument("--remat", default="dots",
                   help="training: what the backward keeps of each layer: none, dots or full "
                   "(default: %(default)s)")
    p.add_argument("--adapter", default="switch", help="switch, lora, layerwise or none "
                   "(the bare backbone) (default: %(default)s)")
    p.add_argument("--experts", default="8", help="experts per adapter (default: %(default)s)")
    p.add_argument("--rank", default="16", help="LoRA rank (default: %(default)s)")
    p.add_argument("--top-k", default="2", help="experts per token (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16",
                   help="backbone dtype: bfloat16 or float32 (default: %(default)s)")
    p.add_argument("--gpu", help="h200, h100 or a100-80g (default: all three)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.set_defaults(func=_plan_command)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types a user causes: bad values and configs, files and folders, checkpoints."""
    errors: tuple[type[BaseException], ...] = (ValueError, OSError)
    checkpoints = sys.modules.get("loraswitch_jax.train.checkpoints")  # loaded only by train
    if checkpoints is not None:
        errors += (checkpoints.CheckpointError,)
    loop = sys.modules.get("loraswitch_jax.train.loop")
    if loop is not None:
        errors += (loop.TrainingDiverged,)  # its message names the step and the good checkpoint
    return errors


def _one_line(e: BaseException) -> str:
    """The error as one line; OS errors as 'what: path' without the errno."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        where = repr(os.fspath(e.filename))
        if e.filename2 is not None:
            where += f" -> {os.fspath(e.filename2)!r}"
        text = f"{e.strerror}: {where}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 2 for a user error, 130 on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("loraswitch: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise  # a bug: keep the traceback
        print(f"loraswitch: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
