"""The bundled model configs, the replay's preset and traces; installed as `harli_jax.configs`."""
