"""Llama model configuration, read from and written to Hugging Face ``config.json``.

Covers the Llama 2 and Llama 3 families: grouped-query attention, ``rope_theta``, ``linear`` and
``llama3`` RoPE scaling, tied or untied embeddings, attention/MLP bias flags. Both the classic
(``rope_theta`` + ``rope_scaling``) and the transformers-5 (``rope_parameters``) spellings are read;
the classic one is written, since every Llama loader understands it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

__all__ = ["ConfigError", "LlamaConfig", "RopeScaling", "PRESETS"]


class ConfigError(ValueError):
    """A config value is unknown, missing or inconsistent."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite real number (a bool is not one; NaN and infinities are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(owner: str, name: str, value) -> None:
    if not _is_number(value):
        raise ConfigError(f"{owner}.{name} must be a finite number, got {value!r}")


_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_type`` ``linear`` or ``llama3``)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            _check_number("RopeScaling", name, getattr(self, name))
        if not _is_int(self.original_max_position_embeddings):
            raise ConfigError(
                "RopeScaling.original_max_position_embeddings must be an integer, got "
                f"{self.original_max_position_embeddings!r}"
            )
        if self.rope_type not in ("linear", "llama3"):
            raise ConfigError(
                f"unsupported rope scaling type {self.rope_type!r}; supported: 'linear', 'llama3'"
            )
        if not self.factor > 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor=}")
        if self.rope_type == "llama3":
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise ConfigError(
                    "llama3 rope scaling needs high_freq_factor > low_freq_factor > 0, got "
                    f"{self.low_freq_factor=}, {self.high_freq_factor=}"
                )
            if self.original_max_position_embeddings <= 0:
                raise ConfigError(f"{self.original_max_position_embeddings=} must be > 0")

    def to_hf(self) -> dict[str, Any]:
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        return {
            "rope_type": "llama3",
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        }


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama decoder. Frozen and hashable, so it is a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is not None and not _is_int(self.head_dim):
            raise ConfigError(f"head_dim must be a positive even integer or None, got {self.head_dim!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            _check_number("LlamaConfig", name, getattr(self, name))
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    "hidden_size must be divisible by num_attention_heads when head_dim is not "
                    f"given: {self.hidden_size=}, {self.num_attention_heads=}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"head_dim must be a positive even integer (RoPE), got {self.head_dim=}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "num_attention_heads must be a multiple of num_key_value_heads (grouped-query "
                f"attention): {self.num_attention_heads=}, {self.num_key_value_heads=}"
            )
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps=}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta=}")
        if _is_int(self.eos_token_id):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        if self.eos_token_id is not None and not isinstance(self.eos_token_id, (list, tuple)):
            raise ConfigError(
                f"eos_token_id must be an integer or a list of integers, got {self.eos_token_id!r}"
            )
        object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id or ()))
        for name, ids in (
            ("bos_token_id", (self.bos_token_id,)),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", (self.pad_token_id,)),
        ):
            for token in ids:
                if token is not None and not _is_int(token):
                    raise ConfigError(f"{name} must hold integer token ids, got {token!r}")
                if token is not None and not 0 <= token < self.vocab_size:
                    raise ConfigError(f"{name}={token} is outside the vocabulary [0, {self.vocab_size})")

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_params(self) -> int:
        d, f, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        per_layer = d * (self.q_size + 2 * self.kv_size) + self.q_size * d + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + embed + d

    # ------------------------------------------------------------------ Hugging Face I/O
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Build from a ``config.json`` dict; unknown architectures and values raise ConfigError."""
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"model_type {model_type!r} is not supported; expected 'llama'")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported; Llama uses 'silu'")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"pretraining_tp={hf['pretraining_tp']} is not supported; use 1")
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if k not in hf]
        if missing:
            raise ConfigError(f"config.json is missing required keys: {', '.join(missing)}")

        rope_params = dict(hf.get("rope_parameters") or {})
        rope_theta = hf.get("rope_theta", rope_params.pop("rope_theta", 10000.0))
        rope_params.pop("rope_theta", None)
        if not _is_number(rope_theta):
            raise ConfigError(f"config.json key 'rope_theta' must be a finite number, got {rope_theta!r}")
        scaling = hf.get("rope_scaling") or rope_params or None
        rope_scaling = None
        if scaling and not isinstance(scaling, dict):
            raise ConfigError(f"config.json key 'rope_scaling' must be an object or null, got {scaling!r}")
        if scaling:
            scaling = dict(scaling)
            rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
            if rope_type not in _ROPE_TYPES:
                raise ConfigError(
                    f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(_ROPE_TYPES)}"
                )
            if rope_type != "default":
                if "factor" not in scaling:
                    raise ConfigError(f"rope scaling {rope_type!r} needs a 'factor'")
                fields = {f.name for f in dataclasses.fields(RopeScaling)}
                for key in fields & set(scaling):
                    kind = "int" if key == "original_max_position_embeddings" else "number"
                    _hf_value(scaling, key, kind, where="rope_scaling.")
                rope_scaling = RopeScaling(
                    rope_type=rope_type, **{k: v for k, v in scaling.items() if k in fields}
                )

        eos = hf.get("eos_token_id", 2)
        if eos is not None and not (_is_int(eos) or (
                isinstance(eos, list) and all(_is_int(t) for t in eos))):
            raise ConfigError(
                f"config.json key 'eos_token_id' must be an integer, a list of integers or null, "
                f"got {eos!r}"
            )
        return cls(
            vocab_size=_hf_value(hf, "vocab_size", "int"),
            hidden_size=_hf_value(hf, "hidden_size", "int"),
            intermediate_size=_hf_value(hf, "intermediate_size", "int"),
            num_hidden_layers=_hf_value(hf, "num_hidden_layers", "int"),
            num_attention_heads=_hf_value(hf, "num_attention_heads", "int"),
            num_key_value_heads=_hf_value(hf, "num_key_value_heads", "int", None)
            or hf["num_attention_heads"],
            head_dim=_hf_value(hf, "head_dim", "int", None),
            max_position_embeddings=_hf_value(hf, "max_position_embeddings", "int", 4096),
            rms_norm_eps=float(_hf_value(hf, "rms_norm_eps", "number", 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=_hf_value(hf, "tie_word_embeddings", "bool", False),
            attention_bias=_hf_value(hf, "attention_bias", "bool", False),
            mlp_bias=_hf_value(hf, "mlp_bias", "bool", False),
            bos_token_id=_hf_value(hf, "bos_token_id", "int", None),
            eos_token_id=tuple([eos] if _is_int(eos) else (eos or ())),
            pad_token_id=_hf_value(hf, "pad_token_id", "int", None),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict (classic ``rope_theta`` + ``rope_scaling`` spelling)."""
        eos = list(self.eos_token_id)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": self.pad_token_id,
        }

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "LlamaConfig":
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in {os.fspath(folder)!r}")
        with open(path) as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} holds a {type(hf).__name__}, expected a JSON object")
        return cls.from_hf_dict(hf)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2)


_HF_KINDS = {
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
}


def _hf_value(hf: dict[str, Any], key: str, kind: str, default: Any = ..., where: str = "") -> Any:
    """``hf[key]`` checked to be of ``kind`` (``null`` gives ``default``); ConfigError names the key."""
    value = hf.get(key)
    if value is None:
        if default is ...:
            raise ConfigError(f"config.json is missing required key {where}{key!r}")
        return default
    check, expected = _HF_KINDS[kind]
    if not check(value):
        raise ConfigError(f"config.json key {where + key!r} must be {expected}, got {value!r}")
    return value


PRESETS: dict[str, LlamaConfig] = {
    # Random-weight demo model: the README's first command runs it on a CPU with no downloads.
    "demo": LlamaConfig(
        vocab_size=259, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=256, eos_token_id=(257,), pad_token_id=258,
    ),
    "llama2-7b": LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    # Llama-2-70B shapes: grouped-query attention (8 KV heads), 80 layers.
    "llama2-70b": LlamaConfig(
        vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    # Llama-3 shapes: a 128256-token vocabulary, rope_theta 500000, 8 KV heads.
    "llama3-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=(128001,),
    ),
    "llama3-70b": LlamaConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=(128001,),
    ),
    # ~1.1B (TinyLlama shapes): grouped-query attention, 22 layers.
    "llama-1b": LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
    ),
}
