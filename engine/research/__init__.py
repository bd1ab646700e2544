"""Research tools behind ``casemask-research`` (not the shipped ``casemask`` command):
recipe sweeps (``sweep``), decoder trials (``autoencoder_trial``), the reference model's
rebuild (``make_reference``) and the training switches the reference recipe fixes.
See docs/engine-research.md."""
