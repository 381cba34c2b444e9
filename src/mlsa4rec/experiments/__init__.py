"""Experiments at scale, on existing engines: studies (a grid of models x datasets x seeds, each
cell an ordinary run directory) and tuning on Optuna, with its storage shared between workers;
tracking a run while it trains; and the reports and plots (``plots``: training curves, bars per
dataset, accuracy and cost against the sequence length) built from run directories alone."""
