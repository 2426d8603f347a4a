"""The package version (one place: ``lora_jax.__version__`` and adapter metadata read it)."""

__version__ = "0.1.0"
