"""loraswitch-jax: dynamic LoRA adapters (LoRA-Switch) for Llama in JAX.

The public API in one namespace; kernels, training and evaluation live in
``loraswitch_jax.pallas``, ``loraswitch_jax.train`` and ``loraswitch_jax.eval``; the Flax NNX face
in ``loraswitch_jax.nnx``; many devices in ``loraswitch_jax.sharding`` and ``loraswitch_jax.parallel``.
"""

from loraswitch_jax.adapter_io import export_merged, load_adapter, merge_lora, save_adapter
from loraswitch_jax.adapters import Adapter, AdapterConfig, AdapterError, init_adapter
from loraswitch_jax.config import PRESETS, ConfigError, LlamaConfig, RopeScaling
from loraswitch_jax.generate import GenerateConfig, Generation, GenerationError, generate
from loraswitch_jax.kv_cache import KVCache, init_cache
from loraswitch_jax.llama import decode_step, forward, prefill
from loraswitch_jax.params import PROJECTIONS, LayerParams, LlamaParams, init_params
from loraswitch_jax.peft_io import export_peft, import_peft
from loraswitch_jax.router import Route, Routing, balance_loss, expert_usage
from loraswitch_jax.sampling import Sampler
from loraswitch_jax.sharding import MeshConfig, MeshError
from loraswitch_jax.weights import WeightsError, load_params, save_params

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterError",
    "Route",
    "Routing",
    "balance_loss",
    "expert_usage",
    "init_adapter",
    "export_merged",
    "export_peft",
    "import_peft",
    "load_adapter",
    "merge_lora",
    "save_adapter",
    "PRESETS",
    "PROJECTIONS",
    "ConfigError",
    "GenerateConfig",
    "Generation",
    "GenerationError",
    "KVCache",
    "LayerParams",
    "LlamaConfig",
    "LlamaParams",
    "MeshConfig",
    "MeshError",
    "RopeScaling",
    "Sampler",
    "WeightsError",
    "decode_step",
    "forward",
    "generate",
    "init_cache",
    "init_params",
    "load_params",
    "prefill",
    "save_params",
]
