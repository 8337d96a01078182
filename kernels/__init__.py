"""Pallas kernels with their pure-JAX references, installed as ``harli_jax.kernels``."""
