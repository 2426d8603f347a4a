"""bank: one forward over a batch mixing adapters equals each row run with its own adapter."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from tests.helpers import served_mlp_and_adapters


def test_mixed_batch_equals_each_row_with_its_own_adapter_and_gradients_stay_in_their_rows():
    x = jax.random.normal(jax.random.key(3), (7, 10))
    served, slots, params, adapters = served_mlp_and_adapters(x)
    bank = lora_jax.make_bank(params, [a for _, _, a in adapters], slots)
    assert bank["fc1"]["lora_A"].shape == (4, 10, 8)
    index = jnp.array([0, 2, -1, 1, 1, 0, -1])
    mixed = jax.jit(lambda b, i, x: lora_jax.bank_apply(served, params, b, i, x))(bank, index, x)
    for row, i in enumerate(np.asarray(index)):
        if i < 0:  # no adapter: the served model's own head, zero LoRA updates
            expected = served.apply({"params": {**params, "fc1": {**params["fc1"], "lora_B": 0 * params["fc1"]["lora_B"]},
                                                "fc2": {**params["fc2"], "lora_B": 0 * params["fc2"]["lora_B"]}}}, x[row:row + 1])
        else:
            own, own_params, _ = adapters[i]
            expected = own.apply({"params": own_params}, x[row:row + 1])
        np.testing.assert_allclose(mixed[row], expected[0], atol=1e-5)

    def loss(b):
        logits = lora_jax.bank_apply(served, params, b, index, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(7) % 3).mean()

    grads = jax.grad(loss)(bank)
    for i in range(4):  # adapters 0, 1, 2 are used; row 3 (no adapter) is a constant
        moved = [float(jnp.abs(g[i]).max()) for g in jax.tree.leaves(grads)]
        assert (max(moved) > 0) == (i < 3), (i, moved)
    unused = lora_jax.bank_apply(served, params, bank, jnp.array([0, 0, 0, 0, 0, 0, 0]), x)
    grads = jax.grad(lambda b: lora_jax.bank_apply(served, params, b, jnp.zeros(7, int), x).sum())(bank)
    assert all(float(jnp.abs(g[1:]).max()) == 0 for g in jax.tree.leaves(grads)) and unused.shape == (7, 3)


def test_out_of_range_or_float_indices_and_adapters_of_other_widths_are_refused():
    import pytest

    x = jax.random.normal(jax.random.key(3), (3, 10))
    served, slots, params, adapters = served_mlp_and_adapters(x)
    bank = lora_jax.make_bank(params, [a for _, _, a in adapters], slots)
    for index, message in ((jnp.array([0, 3, -1]), r"rows \[1\] hold \[3\]"), (jnp.array([0, -2, 1]), r"rows \[1\] hold \[-2\]"),
                           (jnp.array([0.0, 1.0, 2.0]), "integer array")):
        with pytest.raises(ValueError, match=message):
            lora_jax.bank_apply(served, params, bank, index, x)
    own_config, adapter = adapters[0][2].config, adapters[0][2]
    wider = jax.tree.map(lambda v: jnp.concatenate([v, v], 0) if v.ndim == 2 and v.shape[0] == 10 else v,
                         dict(adapter.params))  # lora_A of fc1 for 20 inputs instead of 10
    with pytest.raises(ValueError, match=r"lora_A at 'fc1' has shape \(20, \d+\).*only the rank"):
        lora_jax.hotswap_adapter(params, lora_jax.Adapter(wider, own_config), slots)
    with pytest.raises(ValueError, match="only the rank"):
        lora_jax.make_bank(params, [lora_jax.Adapter(wider, own_config)], slots)
