"""Per-device memory of a generate or train run, from its compiled program on abstract shapes.

:func:`plan` builds the run's arguments as ``jax.ShapeDtypeStruct`` s carrying the shardings
``loraswitch_jax.sharding`` gives them (nothing is allocated), lowers and compiles the program the
run executes (``generate.generate_batch``: prefill, then the decode loop; or the train step as
``train.placement`` jits it) and reads ``compiled.memory_analysis()``:

* weights, adapters, optimizer state, inputs: exact, each argument's per-device shard size
  (``sharding.shard_shape``) times its itemsize.
* KV cache (inference): the cache ``generate_batch`` creates inside the program, from its shape
  and ``sharding.cache_specs``; it lives in the program's temporaries, so it is taken out of them.
* activations / temporaries: ``temp_size_in_bytes`` (the compiled program's scratch: activations,
  logits, gradients, collectives' buffers), less the KV cache.
* total: ``argument + output - alias + temp`` of the compiled program (donated state counted
  once). Generated code is not counted (it lives in host memory on CPU, and is a few MB on GPU).

On CPU, XLA computes 16-bit dots and scatters in float32: its program holds float32 copies of
weight slices and of the KV cache that a GPU compile does not make, so a CPU plan's temporaries
are an upper bound for a GPU. Run the planner on the GPU for the GPU's own figure.

A mesh larger than the visible devices compiles in a subprocess: with that many CPU host
devices, or on a GPU host first as that many mock GPUs (``jax_mock_gpu_topology``). The train
step scans its layers, so its compile time does not grow with depth; ``generate``'s decode step
unrolls them (static layer indices), so its compile does (about a CPU minute for 80 layers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from loraswitch_jax.adapters import MODES, AdapterConfig, init_adapter
from loraswitch_jax.config import PRESETS, LlamaConfig
from loraswitch_jax.kv_cache import KVCache
from loraswitch_jax.params import init_params
from loraswitch_jax.sharding import (MeshConfig, MeshError, cache_specs, check_tensor_fits,
                                     kv_replicas)

__all__ = ["GPUS", "HEADROOM", "MemoryPlan", "PlanError", "format_plan", "plan", "resolve_model",
           "usable_bytes"]

GIB = 2**30
# Memory as nvidia-smi reports it (MiB): "80 GB" and "141 GB" parts.
GPUS = {"h100": 81559 * 2**20, "a100-80g": 81920 * 2**20, "h200": 143771 * 2**20}
# Kept free for the CUDA context, cuBLAS/cuDNN workspaces and allocator fragmentation.
HEADROOM = 0.10
_CHILD = "LORASWITCH_PLAN_CHILD"


class PlanError(ValueError):
    """A plan request that cannot be compiled: a bad model, mesh, size or adapter."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one run, from its compiled program (module doc).

    ``weights + adapters + kv_cache + optimizer + inputs + activations + outputs == total``.
    """

    model: str
    mode: str  # "inference" or "training"
    mesh: str
    devices: int
    batch: int
    tokens: int  # context (inference) or sequence length (training)
    dtype: str
    adapter: str
    weights: int
    adapters: int
    kv_cache: int
    optimizer: int
    inputs: int  # tokens, lengths, keys, the train batch, step and rng
    activations: int  # compiled temporaries less the KV cache
    outputs: int  # outputs not aliased to a donated input
    total: int
    platform: str
    compile_s: float
    compiled: dict  # memory_analysis()'s raw figures
    notes: tuple[str, ...] = ()

    def fits(self, gpu: str, headroom: float = HEADROOM) -> bool:
        """Whether :attr:`total` fits ``gpu``'s memory less ``headroom`` (a fraction)."""
        return self.total <= usable_bytes(gpu, headroom)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def usable_bytes(gpu: str, headroom: float = HEADROOM) -> int:
    if gpu not in GPUS:
        raise PlanError(f"unknown gpu {gpu!r}; expected one of {', '.join(GPUS)}")
    return int(GPUS[gpu] * (1 - headroom))


def resolve_model(model: str | dict | LlamaConfig) -> LlamaConfig:
    """A preset name, a Hugging Face folder with ``config.json`` or a ``config.json`` dict as a
    :class:`LlamaConfig`."""
    if isinstance(model, LlamaConfig):
        return model
    if isinstance(model, dict):
        return LlamaConfig.from_hf_dict(model)
    if model in PRESETS:
        return PRESETS[model]
    if os.path.isdir(model):
        return LlamaConfig.from_pretrained(model)
    raise PlanError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a folder "
                    "with a config.json")


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlanError(f"{name} must be a positive integer, got {value!r}")


def _adapter_config(adapter: str, experts: int, rank: int, top_k: int) -> AdapterConfig | None:
    if adapter == "none":
        return None
    if adapter not in MODES:
        raise PlanError(f"adapter must be one of {', '.join(MODES + ('none',))}, got {adapter!r}")
    for name, value in (("experts", experts), ("rank", rank), ("top_k", top_k)):
        _positive(name, value)
    if adapter == "lora":
        return AdapterConfig.lora(rank=rank)
    try:
        return AdapterConfig(mode=adapter, rank=rank, num_experts=experts, top_k=top_k)
    except ValueError as e:
        raise PlanError(str(e)) from None


def _shard_bytes(tree) -> int:
    """Bytes of one device's shard of every leaf (the largest shard: uneven splits pad)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.shape if getattr(x, "sharding", None) is None else x.sharding.shard_shape(x.shape)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # stored as its key data
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), x.dtype))
            total += math.prod(shape) * math.prod(data.shape) * data.dtype.itemsize
        else:
            total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _abstract(tree, mesh, specs):
    """``tree``'s shape structs carrying ``NamedSharding(mesh, spec)`` (``mesh=None``: none)."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                          sharding=NamedSharding(mesh, s)),
                        tree, specs, is_leaf=lambda s: isinstance(s, P))


def _replicated(tree, mesh):
    return _abstract(tree, mesh, jax.tree.map(lambda _: P(), tree))


def _inference(cfg, mc, batch, context, new_tokens, dtype, acfg):
    """The lowered ``generate_batch``, its argument groups and the in-program KV cache bytes."""
    from loraswitch_jax.generate import GenerateConfig, generate_batch
    from loraswitch_jax.sharding import adapter_specs, expand_kv_heads, param_specs

    if context > cfg.max_position_embeddings:
        raise PlanError(f"context {context} is more than the model's max_position_embeddings "
                        f"({cfg.max_position_embeddings})")
    if not new_tokens < context:
        raise PlanError(f"new_tokens ({new_tokens}) must be less than the context ({context})")
    params = jax.eval_shape(lambda k: init_params(cfg, k, dtype), jax.random.key(0))
    adapter = None if acfg is None else jax.eval_shape(  # float32, as load_adapter gives it
        lambda k: init_adapter(cfg, acfg, k), jax.random.key(0))
    mesh = None if mc.size == 1 else mc.make_mesh()
    if mesh is not None:  # what parallel.place does: KV heads expanded, then split
        params, adapter = jax.eval_shape(lambda p, a: expand_kv_heads(p, a, cfg, mc.tensor),
                                         params, adapter)
        params = _abstract(params, mesh, param_specs(params, mc))
        if adapter is not None:
            adapter = _abstract(adapter, mesh, adapter_specs(adapter, mc))
    prompt = context - new_tokens
    width = min(max(8, 1 << (prompt - 1).bit_length()), context)  # generate's bucket
    inputs = _replicated((jax.ShapeDtypeStruct((batch, width), jnp.int32),
                          jax.ShapeDtypeStruct((batch,), jnp.int32),
                          jax.eval_shape(lambda: jax.random.key(0))), mesh)
    gen = GenerateConfig(max_new_tokens=new_tokens, mesh=None if mesh is None else mc)
    lowered = generate_batch.lower(params, adapter, *inputs, cfg=cfg, gen=gen,
                                   cache_len=context, stream=None)
    kv = cfg.num_key_value_heads * kv_replicas(cfg, mc.tensor)
    shape = (cfg.num_hidden_layers, batch, context, kv, cfg.head_dim)
    cache = KVCache(k=jax.ShapeDtypeStruct(shape, dtype), v=jax.ShapeDtypeStruct(shape, dtype),
                    lengths=jax.ShapeDtypeStruct((batch,), jnp.int32))
    if mesh is not None:
        cache = _abstract(cache, mesh, cache_specs(cache, mc))
    groups = {"weights": params, "adapters": adapter, "optimizer": None, "inputs": inputs}
    return lowered, groups, _shard_bytes(cache)


def _training(cfg, mc, batch, seq_len, dtype, acfg, remat, grad_accum, attention_chunk,
              attention_impl="xla", loss_chunk=None):
    """The lowered train step (as ``train.placement`` jits it) and its argument groups."""
    from loraswitch_jax.attention import ATTENTION_IMPLS
    from loraswitch_jax.llama import REMAT_POLICIES
    from loraswitch_jax.train.placement import plan_placement
    from loraswitch_jax.train.step import OptimConfig, init_state

    if acfg is None:
        raise PlanError("training needs an adapter (switch, lora or layerwise): the backbone "
                        "is frozen")
    if remat not in REMAT_POLICIES:
        raise PlanError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
    _positive("grad_accum", grad_accum)
    if attention_impl not in ATTENTION_IMPLS:
        raise PlanError(f"attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, got "
                        f"{attention_impl!r}")
    if attention_impl == "cudnn" and jax.default_backend() != "gpu":
        raise PlanError(f"attention_impl 'cudnn' compiles only on a GPU (backend is "
                        f"{jax.default_backend()!r})")
    if loss_chunk is not None:
        _positive("loss_chunk", loss_chunk)
    if seq_len > cfg.max_position_embeddings:
        raise PlanError(f"seq_len {seq_len} is more than the model's max_position_embeddings "
                        f"({cfg.max_position_embeddings})")
    oc = OptimConfig(grad_accum=grad_accum)
    params = jax.eval_shape(lambda k: init_params(cfg, k, dtype), jax.random.key(0))
    state = jax.eval_shape(lambda k: init_state(init_adapter(cfg, acfg, k), oc, 0),
                           jax.random.key(0))
    try:
        placement = plan_placement(mc, cfg, params, state, batch)
    except MeshError as e:
        raise PlanError(f"mesh {mc}: {e}") from None

    def put(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            tree, shardings)

    params, state = put(params, placement.params), put(state, placement.state)
    shape = (grad_accum, batch, seq_len)
    # cudnn attention takes unpacked rows without segment_ids (as the training loop gives them).
    keys = ("tokens", "targets", "loss_mask", "positions",
            *(("segment_ids",) if attention_impl == "xla" else ()))
    batch_tree = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32,
                                          sharding=placement.batch) for k in keys}
    lowered = placement.train_step.lower(state, params, batch_tree, cfg=cfg, oc=oc, remat=remat,
                                         attention_chunk=attention_chunk,
                                         attention_impl=attention_impl, loss_chunk=loss_chunk)
    groups = {"weights": params, "adapters": state.adapter, "optimizer": state.opt_state,
              "inputs": (batch_tree, state.step, state.rng)}
    return lowered, groups


def plan(model: str | dict | LlamaConfig = "llama2-7b", mesh: str | MeshConfig = "", *,
         batch: int = 1, context: int = 4096, new_tokens: int = 128, train: bool = False,
         seq_len: int = 2048, remat: str = "dots", adapter: str = "switch", experts: int = 8,
         rank: int = 16, top_k: int = 2, dtype: str = "bfloat16", grad_accum: int = 1,
         attention_chunk: int | None = 512, attention_impl: str = "xla",
         loss_chunk: int | None = None) -> MemoryPlan:
    """Per-device memory of generating (or, with ``train``, of one train step) on ``mesh``.

    Args:
      model: a preset name (``llama2-70b``, ``llama3-8b``, ...), a Hugging Face folder with a
        ``config.json`` or a :class:`LlamaConfig`.
      mesh: ``"tensor=4"`` style axis sizes (``sharding.MeshConfig``); ``""``: one device.
        A CPU with fewer devices than the mesh compiles in a subprocess with that many host
        devices (``--xla_force_host_platform_device_count``).
      batch: rows (prompts, or sequences per micro-batch).
      context: inference: the KV cache length; the prompt is ``context - new_tokens`` tokens.
      new_tokens: inference: tokens the decode loop generates.
      train, seq_len, remat, grad_accum, attention_chunk, attention_impl, loss_chunk: the train
        step's (``TrainConfig``; ``attention_impl="cudnn"`` compiles only on a GPU).
      adapter, experts, rank, top_k: the adapter (``"none"``: the bare backbone, inference only).
      dtype: the backbone's dtype, ``bfloat16`` or ``float32`` (adapters stay float32).

    Raises:
      PlanError: a bad argument (the message names it) or a mesh the model cannot split over.
    """
    cfg = resolve_model(model)
    name = model if isinstance(model, str) else "custom"
    try:
        mc = mesh if isinstance(mesh, MeshConfig) else MeshConfig.parse(mesh)
    except MeshError as e:
        raise PlanError(f"mesh: {e}") from None
    for key, value in (("batch", batch), ("context", context), ("new_tokens", new_tokens),
                       ("seq_len", seq_len)):
        _positive(key, value)
    if dtype not in ("bfloat16", "float32"):
        raise PlanError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    acfg = _adapter_config(adapter, experts, rank, top_k)
    try:
        check_tensor_fits(cfg, mc)
    except MeshError as e:
        raise PlanError(f"mesh {mc}: {e}") from None
    if mc.size > jax.device_count():
        child = _plan_in_subprocess(mc.size, dict(
            model=cfg.to_hf_dict(), mesh=str(mc),
            batch=batch, context=context, new_tokens=new_tokens, train=train, seq_len=seq_len,
            remat=remat, adapter=adapter, experts=experts, rank=rank, top_k=top_k, dtype=dtype,
            grad_accum=grad_accum, attention_chunk=attention_chunk,
            attention_impl=attention_impl, loss_chunk=loss_chunk))
        return dataclasses.replace(child, model=name)

    t0 = time.perf_counter()
    try:
        if train:
            lowered, groups = _training(cfg, mc, batch, seq_len, jnp.dtype(dtype), acfg, remat,
                                        grad_accum, attention_chunk, attention_impl, loss_chunk)
            kv = 0
        else:
            lowered, groups, kv = _inference(cfg, mc, batch, context, new_tokens,
                                             jnp.dtype(dtype), acfg)
    except MeshError as e:
        raise PlanError(f"mesh {mc}: {e}") from None
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    raw = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                           "alias_size_in_bytes", "temp_size_in_bytes",
                                           "generated_code_size_in_bytes")}
    sizes = {k: _shard_bytes(v) for k, v in groups.items()}
    total = (raw["argument_size_in_bytes"] + raw["output_size_in_bytes"]
             - raw["alias_size_in_bytes"] + raw["temp_size_in_bytes"])
    outputs = raw["output_size_in_bytes"] - raw["alias_size_in_bytes"]
    activations = raw["temp_size_in_bytes"] - kv
    platform = jax.devices()[0].platform
    notes = []
    # Arguments the compiler sees beyond our groups (or fewer: unused ones pruned) go to inputs.
    inputs = raw["argument_size_in_bytes"] - sizes["weights"] - sizes["adapters"] - sizes["optimizer"]
    if inputs != sizes["inputs"]:
        notes.append(f"the compiled program's arguments differ from the shardings' arithmetic by "
                     f"{(inputs - sizes['inputs']) / GIB:+.3f} GiB (counted under inputs)")
    if platform == "cpu" and dtype != "float32":
        notes.append("compiled on CPU: XLA's CPU backend computes bfloat16 dots and scatters in "
                     "float32, so the temporaries hold float32 copies of weights (and of the KV "
                     "cache) that a GPU compile does not make: an upper bound; run "
                     "`loraswitch plan` on the GPU for its figure")
    if activations < 0:
        notes.append("the compiled temporaries are smaller than the KV cache (XLA keeps it "
                     "elsewhere); activations shown as 0")
        total, activations = total - activations, 0
    return MemoryPlan(
        model=name, mode="training" if train else "inference", mesh=str(mc), devices=mc.size,
        batch=batch, tokens=seq_len if train else context, dtype=dtype,
        adapter="none" if acfg is None else (
            f"{acfg.mode} ({acfg.num_experts} experts, rank {acfg.rank}, top-{acfg.top_k})"),
        weights=sizes["weights"], adapters=sizes["adapters"], kv_cache=kv,
        optimizer=sizes["optimizer"], inputs=inputs, activations=activations, outputs=outputs,
        total=total, platform=platform, compile_s=round(compile_s, 2), compiled=raw,
        notes=tuple(notes))


def format_plan(p: MemoryPlan, gpus: tuple[str, ...] = tuple(GPUS),
                headroom: float = HEADROOM) -> str:
    """The plan as the CLI prints it: one line per category, then a fit verdict per GPU."""
    what = (f"training step, seq_len {p.tokens}" if p.mode == "training"
            else f"generation, context {p.tokens}")
    lines = [f"{p.model}: {what}, batch {p.batch}, {p.dtype}, adapter {p.adapter}",
             f"mesh {p.mesh} ({p.devices} device{'s' * (p.devices > 1)}); compiled on "
             f"{p.platform} in {p.compile_s:.1f}s from abstract shapes (nothing allocated)",
             "per device:"]
    rows = [("weights", p.weights), ("adapters", p.adapters), ("KV cache", p.kv_cache),
            ("optimizer state", p.optimizer), ("activations/temporaries", p.activations),
            ("inputs and outputs", p.inputs + p.outputs), ("total", p.total)]
    lines += [f"  {k:<24}{_size(v):>12}" for k, v in rows]
    for gpu in gpus:
        room = usable_bytes(gpu, headroom)
        verdict = "fits" if p.fits(gpu, headroom) else "does NOT fit"
        lines.append(f"{verdict} one {gpu} ({GPUS[gpu] / GIB:.1f} GiB, {room / GIB:.1f} GiB "
                     f"after {headroom:.0%} headroom)")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _plan_in_subprocess(n_devices: int, kwargs: dict) -> MemoryPlan:
    """:func:`plan` in a fresh CPU process with ``n_devices`` host devices (XLA reads the count
    once, when the backend starts, so this process cannot grow its own)."""
    if os.environ.get(_CHILD):
        raise PlanError(f"mesh {kwargs['mesh']} needs {n_devices} devices, but only "
                        f"{jax.device_count()} are visible")
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if "xla_force_host_platform_device_count" not in f)
    cpu = {_CHILD: "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n_devices}".strip()}
    tries = [(cpu, f"{n_devices} CPU host devices")]
    if jax.devices()[0].platform == "gpu":  # one GPU compiles for N as N mock hosts of one GPU
        tries.insert(0, ({_CHILD: "1", "JAX_MOCK_GPU_TOPOLOGY": f"1x{n_devices}x1",
                          "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
                         f"{n_devices} mock GPUs (jax_mock_gpu_topology 1x{n_devices}x1)"))
    failures = []
    for env, what in tries:
        proc = subprocess.run([sys.executable, "-m", "loraswitch_jax.planner", json.dumps(kwargs)],
                              capture_output=True, text=True, env={**os.environ, **env})
        if proc.returncode == 2:
            raise PlanError(proc.stderr.strip().splitlines()[-1])
        if proc.returncode == 0:
            d = json.loads(proc.stdout)
            d["notes"] = tuple(d["notes"]) + (f"compiled in a subprocess for {what}: this "
                                              "process has fewer devices",)
            return MemoryPlan(**d)
        failures.append(f"{what}:\n{proc.stderr[-3000:]}")
    raise RuntimeError("the planner's subprocess failed:\n" + "\n".join(failures))


def _child_main(argv: list[str]) -> int:
    try:
        result = plan(**json.loads(argv[0]))
    except PlanError as e:
        print(" ".join(str(e).split()), file=sys.stderr)
        return 2
    print(result.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
