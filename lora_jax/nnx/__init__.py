"""The NNX front end: LoRA on ``flax.nnx`` models (``transform``), their params as linen-shaped trees
and back (``trees``), quantized kernels in place (``quantized``, ``variables``), and the tree verbs for
models (``verbs``). Everything below ``lora_jax.nnx`` takes param trees only; a model is converted here,
at this boundary."""
