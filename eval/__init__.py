"""Evaluation of loraswitch_jax, in two parts that share nothing:

* ``bench/``: speed. Latency and throughput benchmarks of decoding, adapters and kernels (a
  harness for timing, environment, bandwidth, launch counting and report writing).
* ``accuracy/``: quality. Pretrains a small byte-level Llama on real text from Debian packages,
  fine-tunes a LoRA, per-layer routed experts and LoRA-Switch at equal parameter budgets, and
  compares them on held-out text and multiple-choice tasks (``python -m
  loraswitch_jax.eval.accuracy``); also the lm-evaluation-harness client.

Results live in ``eval/results/``. Importing this package runs nothing.
"""
