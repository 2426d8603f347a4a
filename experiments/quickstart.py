"""A 30-second tour of the API: LoRA on a small MLP, train, merge, check the merge is exact; then the same
on a flax.nnx model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from experiments.mlp import MLP


def main() -> None:
    base = MLP((64, 64, 4))
    x = jax.random.normal(jax.random.key(0), (256, 16))
    y = (x[:, :4].argmax(-1) + (x[:, 4] > 0)) % 4  # a task the random base does not solve
    base_params = base.init(jax.random.key(1), x)["params"]

    config = lora_jax.LoraConfig(rank=4, alpha=8, targets=("fc1", "fc2", "fc3"))
    model = lora_jax.lora(base, config)
    params = lora_jax.init_lora_params(model, base_params, jax.random.key(2), x)
    mask = lora_jax.trainable_mask(params, config)
    lora_jax.print_trainable_parameters(params, config)

    def loss_fn(p, batch, rng):
        logits = model.apply({"params": p}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    tx = optax.adam(1e-2)
    state = lora_jax.TrainState.create(params, mask, tx, jax.random.key(3))
    step = lora_jax.make_train_step(loss_fn, tx, mask)
    for i in range(200):
        state, metrics = step(state, (x, y))
        if i % 50 == 0 or i == 199:
            print(f"step {i:3d}  loss {float(metrics['loss']):.4f}")

    merged = lora_jax.merge(state.params, config)
    lora_out = model.apply({"params": state.params}, x)
    merged_out = base.apply({"params": merged}, x)
    accuracy = float((merged_out.argmax(-1) == y).mean())
    print(f"accuracy {accuracy:.3f}; max |merged - unmerged| = {float(jnp.abs(merged_out - lora_out).max()):.2e}")
    same_base = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(base_params), jax.tree.leaves(lora_jax.partition(state.params, mask)[1])))
    print(f"frozen base unchanged: {same_base}")
    nnx_tour(x, y, config)


def nnx_tour(x: jax.Array, y: jax.Array, config: lora_jax.LoraConfig) -> None:
    """The same task on an NNX model: LoRA in place, nnx.Optimizer over nnx.LoRAParam, merge."""
    from flax import nnx

    class Mlp(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.fc1, self.fc2, self.fc3 = (nnx.Linear(16, 64, rngs=rngs), nnx.Linear(64, 64, rngs=rngs),
                                            nnx.Linear(64, 4, rngs=rngs))

        def __call__(self, h: jax.Array) -> jax.Array:
            return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(h)))))

    model = Mlp(nnx.Rngs(1))
    lora_jax.lora(model, config, rngs=nnx.Rngs(2))  # in place; the factors are nnx.LoRAParam
    lora_jax.print_trainable_parameters(model, config)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    for i in range(200):
        loss = step(model, optimizer, x, y)
        if i % 100 == 0 or i == 199:
            print(f"nnx step {i:3d}  loss {float(loss):.4f}")
    merged = lora_jax.merge(model, config)  # a copy with plain nnx.Linear layers
    gap = float(jnp.abs(merged(x) - model(x)).max())
    print(f"nnx: merged layers are {type(merged.fc1).__name__}; accuracy {float((merged(x).argmax(-1) == y).mean()):.3f}; "
          f"max |merged - unmerged| = {gap:.2e}")


if __name__ == "__main__":
    main()
