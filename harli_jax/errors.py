"""Errors that name the input at fault, raised instead of tracebacks from deep inside JAX."""


class HarliError(Exception):
    """Base class of every error harli_jax raises on purpose."""


class ConfigError(HarliError, ValueError):
    """A model, engine or job configuration that cannot be used as given."""


class CheckpointError(HarliError, ValueError):
    """A checkpoint directory or file that cannot be loaded or written."""
