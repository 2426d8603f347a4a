"""The benchmark's decoder: causal (a position never sees later tokens) and its loss the mean
next-token cross-entropy, by hand."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments.decoder import Decoder, next_token_loss


def test_decoder_is_causal_and_its_loss_is_next_token_cross_entropy():
    model = Decoder(vocab=32, hidden=16, layers=2, heads=2)
    ids = jnp.array([[1, 5, 7, 3, 9, 2]])
    params = model.init(jax.random.key(0), ids)["params"]
    logits = model.apply({"params": params}, ids)
    changed = model.apply({"params": params}, ids.at[0, 4].set(11))
    np.testing.assert_allclose(logits[:, :4], changed[:, :4], atol=1e-6)  # positions before the change
    assert float(jnp.abs(logits[:, 4:] - changed[:, 4:]).max()) > 1e-4
    z = np.asarray(logits[0, :-1], np.float64)
    log_probs = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    expected = -np.mean(log_probs[np.arange(5), np.asarray(ids[0, 1:])])
    np.testing.assert_allclose(next_token_loss(logits, ids), expected, rtol=1e-5)
