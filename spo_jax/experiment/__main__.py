"""``python -m spo_jax.experiment``: the evidence grid (:func:`spo_jax.experiment.cli.main`)."""

from spo_jax.experiment.cli import main

main()
