"""``python -m loraswitch_jax.eval.accuracy``: the experiment's command line
(:func:`~loraswitch_jax.eval.accuracy.experiment.main`)."""

from loraswitch_jax.eval.accuracy.experiment import main

if __name__ == "__main__":
    main()
