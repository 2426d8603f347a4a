"""Shared fixtures (inputs for the all-kinds model, a tiny BERT folder); helpers live in tests/helpers.py."""

from __future__ import annotations

import os
import shutil
import tempfile

# The tests run tiny models, whose cost is XLA's compile time, most of it LLVM optimising the generated
# code, which buys nothing at these sizes: a third of the suite's CPU time. Set before jax starts its
# backend; subprocesses of the tests inherit it. Numerics and XLA's buffer sizes do not depend on it.
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))

# One compile per program per test run: many tests build the same tiny models (the tiny BERT of the
# experiment smoke tests, their train steps), and XLA's persistent cache compiles each identical
# program once. The first process (pytest, or xdist's controller) makes a fresh folder for the run;
# the xdist workers and the tests' subprocesses inherit it through the environment, so no test sees a
# program compiled by another version of the code; the folder goes when the run ends.
if "LORA_JAX_TEST_CACHE" not in os.environ:
    os.environ["LORA_JAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="lora_jax_tests_")
    _OWN_CACHE = True
else:
    _OWN_CACHE = False
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["LORA_JAX_TEST_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.05"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import TINY_BERT  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["LORA_JAX_TEST_CACHE"], ignore_errors=True)


@pytest.fixture
def all_kinds_inputs():
    ids = jnp.arange(12).reshape(2, 6) % 20
    img = jax.random.normal(jax.random.key(7), (2, 8, 8, 3))
    return ids, img


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer, hidden-32 BERT with the packaged MiniLM's tokenizer, saved as a Hugging Face folder
    (random weights): fast stand-in for a real checkpoint in experiment smoke tests."""
    import json
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    from lora_jax.models import BertConfig, BertModel, packaged_minilm_path
    from lora_jax.models.pretrained import hf_key
    from flax import traverse_util

    folder = tmp_path_factory.mktemp("tiny_bert")
    source = packaged_minilm_path()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    config = BertConfig(vocab_size=vocab, **TINY_BERT)
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), "architectures": ["BertModel"]}))
    params = BertModel(config).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    state = {"bert." + hf_key(key[:-1], key[-1]): np.asarray(value.T if key[-1] == "kernel" else value)
             for key, value in traverse_util.flatten_dict(params).items()}
    save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(autouse=True, scope="session")
def _cpu_threads():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield
