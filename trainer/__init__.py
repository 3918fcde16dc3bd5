"""Training code for CMD video diffusion: data sets, attribute metrics, training loops."""
