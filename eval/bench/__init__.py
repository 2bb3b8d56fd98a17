"""GPU benchmarks: a shared harness and one runnable module per benchmark.

* :mod:`.harness` timing, environment (GPU, JAX version, date), copy bandwidth, report writing;
* :mod:`.launches` kernel launches counted from compiled HLO;
* :mod:`.decode` backbone decode against the copy-bandwidth floor;
* :mod:`.adapters` dynamic adapters beside the backbone (cases in :mod:`.adapter_cases`, one
  case measured by :mod:`.adapter_measure`, tables and checks in :mod:`.adapter_report`);
* :mod:`.kernels` every Pallas kernel against its reference; :mod:`.kernel_sweep` block sizes;
* :mod:`.profile` device time per kernel group of one decode step;
* :mod:`.peers` transformers, peft and MixLoRA on the same GPU.

Each runs as ``python -m loraswitch_jax.eval.bench.<name>``; importing one runs nothing.
"""
