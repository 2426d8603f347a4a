"""The linen front end: ``transform`` (``lora(model, config)``, a module transform whose interceptor
finds the targeted layers) and ``layers`` (per layer: read its attributes into a core plan, create
lora_A / lora_B beside its kernel, compute through ``lora_jax.core``)."""
