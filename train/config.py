"""The training run's config: one frozen dataclass of nested frozen dataclasses, from JSON.

A config file is JSON with the sections ``adapter`` (:class:`AdapterConfig`), ``data``
(:class:`DataConfig`), ``optim`` (:class:`OptimConfig`) and the run's own fields. Command-line
overrides use dotted keys: ``optim.lr=1e-3 adapter.num_experts=16 steps=500``; values are parsed as
JSON when they can be (numbers, booleans, lists), else taken as strings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing

from loraswitch_jax.adapters import AdapterConfig
from loraswitch_jax.attention import ATTENTION_IMPLS
from loraswitch_jax.config import PRESETS
from loraswitch_jax.llama import REMAT_POLICIES
from loraswitch_jax.sharding import MeshConfig, MeshError
from loraswitch_jax.train.data import DataConfig
from loraswitch_jax.train.step import OptimConfig

__all__ = ["ConfigFileError", "TrainConfig", "demo_config_dict", "load_train_config", "to_dict"]


class ConfigFileError(ValueError):
    """A training config file or override that cannot be read."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run needs.

    Attributes:
      model: a preset name (``demo``, ``llama-1b``, ...: random weights) or a Hugging Face folder.
      dtype: the backbone's compute dtype, ``bfloat16`` or ``float32``; adapters stay float32.
      out_dir: checkpoints, ``metrics.jsonl``, the exported adapter and the report go here.
      init_seed: seed of fresh adapter weights (and of random preset backbones).
      eval_every / eval_batches: held-out loss every N steps on at most M batches (0: all).
      save_every / keep: checkpoint every N steps, keep the last K.
      log_every: metrics line (and progress-bar update) every N steps.
      mesh: axis sizes ``"data=2,fsdp=2,tensor=2"`` (``loraswitch_jax.sharding``): the batch's
        rows over ``data`` and ``fsdp``, the frozen backbone, adapter and optimizer state split
        over ``fsdp`` (and ``tensor``, Megatron). ``""``: ``data_parallel`` devices on ``data``
        (0: all, or as many as divide ``data.batch_size``), or on ``fsdp`` with ``fsdp=true``;
        give ``mesh`` or those two, not both.
      remat: what the backward keeps of each layer (``"none"``, ``"dots"``: weight matmul
        outputs, ``"full"``: layer inputs only); default ``"dots"``: attention and elementwise
        work is recomputed, the matmuls are not, and an 8B model's activations fit one GPU.
      attention_chunk: rows longer than this attend blockwise, never holding ``T x T`` scores
        (``null``: always dense).
      attention_impl: ``"xla"`` (dense or blockwise jnp attention) or ``"cudnn"`` (the GPU's
        fused attention). ``cudnn`` cannot keep packed sequences apart, so it needs
        ``data.pack`` false; the loop then drops the batches' ``segment_ids``, which in unpacked
        rows only mark the trailing padding (causality already hides it from real tokens).
      loss_chunk: the cross-entropy applies the LM head to this many tokens at a time, never
        holding the whole ``[B, T, V]`` float32 logits (``train.loss.chunked_cross_entropy``;
        ``null``, the default until it is timed on a GPU: all at once). Same results.
    """

    model: str = "demo"
    dtype: str = "bfloat16"
    out_dir: str = "runs/default"
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig | None = None
    optim: OptimConfig = OptimConfig()
    init_seed: int = 0
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 50
    keep: int = 3
    log_every: int = 10
    data_parallel: int = 0
    fsdp: bool = False
    mesh: str = ""
    remat: str = "dots"
    attention_chunk: int | None = 512
    attention_impl: str = "xla"
    loss_chunk: int | None = None

    def __post_init__(self):
        for name in ("model", "out_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigFileError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ConfigFileError(f"dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
        if not isinstance(self.init_seed, int) or isinstance(self.init_seed, bool):
            raise ConfigFileError(f"init_seed must be an integer, got {self.init_seed!r}")
        for name, low in (("eval_every", 1), ("save_every", 1), ("keep", 1), ("log_every", 1),
                          ("eval_batches", 0), ("data_parallel", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigFileError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.fsdp, bool):
            raise ConfigFileError(f"fsdp must be true or false, got {self.fsdp!r}")
        if self.data is None:
            raise ConfigFileError("the config has no 'data' section (path, seq_len, batch_size, ...)")
        if not isinstance(self.mesh, str):
            raise ConfigFileError(f"mesh must be a string like 'fsdp=2,tensor=2', got {self.mesh!r}")
        if self.mesh:
            try:
                MeshConfig.parse(self.mesh)
            except MeshError as e:
                raise ConfigFileError(f"mesh: {e}") from None
            if self.data_parallel or self.fsdp:
                raise ConfigFileError("give mesh or data_parallel/fsdp, not both (mesh "
                                      f"{self.mesh!r}, data_parallel={self.data_parallel}, "
                                      f"fsdp={self.fsdp})")
        if self.remat not in REMAT_POLICIES:
            raise ConfigFileError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
        chunk = self.attention_chunk
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise ConfigFileError(f"attention_chunk must be an integer >= 1 or null, got {chunk!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigFileError(f"attention_impl must be one of {ATTENTION_IMPLS}, got "
                                  f"{self.attention_impl!r}")
        if self.attention_impl == "cudnn" and self.data.pack:
            raise ConfigFileError("attention_impl 'cudnn' cannot keep packed sequences apart: set "
                                  "data.pack=false (one sequence per row) or attention_impl=xla")
        chunk = self.loss_chunk
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise ConfigFileError(f"loss_chunk must be an integer >= 1 or null, got {chunk!r}")
        preset = PRESETS.get(self.model)
        if preset is not None and self.data.seq_len > preset.max_position_embeddings:
            # Folders are checked when their config.json is read (train.loop.check_positions).
            raise ConfigFileError(
                f"data.seq_len {self.data.seq_len} is more than the model's "
                f"max_position_embeddings ({preset.max_position_embeddings}, {self.model}): "
                f"positions past it are never trained; set data.seq_len <= "
                f"{preset.max_position_embeddings}"
            )

    def mesh_config(self, n_devices: int) -> MeshConfig:
        """The run's mesh sizes; ``n_devices`` (visible devices) sizes the legacy default."""
        if self.mesh:
            return MeshConfig.parse(self.mesh)
        n = self.data_parallel
        if not n:  # all devices, or as many as divide the batch (a small batch on 8 devices)
            n = max(d for d in range(1, n_devices + 1) if self.data.batch_size % d == 0)
        return MeshConfig(fsdp=n) if self.fsdp else MeshConfig(data=n)

    def identity(self) -> dict:
        """What a checkpoint must share with this config to be resumed."""
        d = to_dict(self)
        return {k: d[k] for k in ("model", "dtype", "adapter", "data", "optim", "init_seed")}


def to_dict(obj) -> dict:
    """Nested dataclasses as JSON-ready dicts (init fields only)."""
    out = {}
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def _nested_type(cls, name: str):
    hints = typing.get_type_hints(cls)
    t = hints[name]
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next((a for a in typing.get_args(t) if a is not type(None)), t)
    return t if dataclasses.is_dataclass(t) else None


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check_type(cls, name: str, value, where: str) -> None:
    """Refuse a JSON value of the wrong kind for a field annotated ``int``, ``float``, ``str``,
    ``bool``, ``tuple[...]`` or one of them ``| None``, naming the field and the expected type."""
    t = typing.get_type_hints(cls)[name]
    union = isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union
    args = typing.get_args(t) if union else (t,)
    if value is None and type(None) in args:
        return
    kinds = [a for a in args if a is not type(None)]
    ok, expected = False, []
    for kind in kinds:
        origin = typing.get_origin(kind) or kind
        if origin is tuple:
            expected.append("a list")
            ok |= isinstance(value, (list, tuple))
        elif kind in _TYPE_NAMES:
            expected.append(_TYPE_NAMES[kind])
            if kind is float:
                ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
                if ok and not math.isfinite(value):
                    raise ConfigFileError(f"{where}{name} must be a finite number, got {value!r}")
            elif kind is int:
                ok |= isinstance(value, int) and not isinstance(value, bool)
            else:
                ok |= isinstance(value, kind)
        else:
            return  # a type this check does not know: the class validates it
    if not ok:
        if type(None) in args:
            expected.append("null")
        raise ConfigFileError(
            f"{where}{name} must be {' or '.join(expected)}, got {value!r} ({type(value).__name__})"
        )


def from_dict(cls, d: dict, where: str = ""):
    """Build dataclass ``cls`` from ``d``, recursing into nested dataclass fields."""
    if not isinstance(d, dict):
        raise ConfigFileError(f"{where or 'config'} must be a JSON object, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigFileError(
            f"unknown keys {unknown} in {where or 'the config'}; expected some of {sorted(fields)}"
        )
    kwargs = {}
    for name, value in d.items():
        nested = _nested_type(cls, name)
        if nested is not None:
            if isinstance(value, dict):
                value = from_dict(nested, value, f"{where}{name}.")
            elif value is not None:
                raise ConfigFileError(f"{where}{name} must be a JSON object (a section), got {value!r}")
        else:
            _check_type(cls, name, value, where)
            if isinstance(value, list):
                value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a required field missing
        raise ConfigFileError(f"{where.rstrip('.') or 'config'}: {e}") from e


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """``["optim.lr=1e-3", ...]`` applied to a nested dict (a copy)."""
    d = json.loads(json.dumps(d))
    for item in overrides:
        if "=" not in item:
            raise ConfigFileError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-3)")
        key, value = item.split("=", 1)
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigFileError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = _parse_value(value)
    return d


def demo_config_dict() -> dict:
    """The default run: a LoRA-Switch adapter (4 experts, top-2) on the random demo model, trained
    on the bundled Python standard-library sample; a few minutes on a CPU."""
    from loraswitch_jax.samples import sample_path

    return {
        "model": "demo",
        "dtype": "float32",
        "out_dir": "runs/demo",
        "adapter": {"mode": "switch", "rank": 8, "alpha": 16.0, "num_experts": 4, "top_k": 2},
        "data": {
            "path": sample_path("python_stdlib.jsonl"), "format": "jsonl", "seq_len": 128,
            "batch_size": 16, "validation_fraction": 0.1,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 10, "steps": 150, "aux_loss_weight": 0.01},
        "eval_every": 25, "eval_batches": 0, "save_every": 25, "log_every": 5,
    }


def load_train_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a JSON config file (the demo config when ``path`` is None) and apply overrides.

    Relative data paths are resolved against the config file's folder.
    """
    d: dict = demo_config_dict() if path is None else {}
    base = os.getcwd()
    if path is not None:
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError as e:
            raise ConfigFileError(f"no config file {os.fspath(path)!r}") from e
        except json.JSONDecodeError as e:
            raise ConfigFileError(f"{os.fspath(path)!r} is not valid JSON: {e}") from e
        base = os.path.dirname(os.path.abspath(path))
    d = apply_overrides(d, list(overrides))
    data = d.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str) and not os.path.isabs(data["path"]):
        candidate = os.path.join(base, data["path"])
        if os.path.exists(candidate) or not os.path.exists(data["path"]):
            data["path"] = candidate
    return from_dict(TrainConfig, d)
