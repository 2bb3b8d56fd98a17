"""Accuracy: does routing once per token (LoRA-Switch) keep per-layer routing's accuracy?

``python -m loraswitch_jax.eval.accuracy --corpus DIR --preset {demo,cpu,gpu} --out OUT`` runs the
experiment (``experiment.py``); ``loraswitch demo`` runs it on the bundled sample. Importing this
package imports none of its modules. The modules, in the order the data flows:

* the corpus, built once from Debian packages (``python -m loraswitch_jax.eval.accuracy.corpus``):
  ``domains`` (the five domains, the held-out split, the unit files), ``debian`` (fetch, unpack
  and read the packages), ``rdata`` (R lazy-load databases: the Austen novels), ``wordnet``
  (WordNet data lines), ``markup`` (plain text: sentences, reST and pod codes), ``corpus``
  (split and write);
* the multiple-choice tasks cut from its held-out units: ``task_items`` (answers and distractors),
  ``leakage`` (texts that repeat training text), ``tasks`` (task files and trivial baselines);
* the experiment: ``presets`` (scales and equal-budget adapters), ``inputs`` (byte ids, scored
  windows and options), ``pretrain`` (the backbone), ``scoring`` (log-likelihoods, intervals),
  ``statistics`` (summaries, paired bootstrap differences), ``experiment`` (fine-tune, evaluate,
  write), ``report`` (statement, tables, plots);
* ``lm_eval_client``: the same models in lm-evaluation-harness (the ``eval`` extra).
"""

__all__: list[str] = []
