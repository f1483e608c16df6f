"""Article text templates and the text encoder (a tiny random BERT, no download)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from recsys.encoders.text import embed_batch, embed_texts, load_text_model, model_id, resolve_model_path
from recsys.sources.schema import render_text

TEMPLATE = "{name}. {category_l3}, {category_l2}. {colour}. {description}"


def test_template_fills_fields() -> None:
    text = render_text(
        TEMPLATE,
        {"name": "Strap top", "category_l3": "Vest top", "category_l2": "Garment Upper body",
         "colour": "Black", "description": "Jersey top with narrow shoulder straps."},
    )
    assert text == "Strap top. Vest top, Garment Upper body. Black. Jersey top with narrow shoulder straps."


def test_template_leaves_no_dangling_punctuation_for_missing_values() -> None:
    text = render_text(TEMPLATE, {"name": "Sneaker", "category_l3": None, "category_l2": "Shoes",
                                  "colour": "", "description": None})
    assert text == "Sneaker. Shoes."
    assert render_text(TEMPLATE, {}) == ""


def test_template_keeps_punctuation_inside_values() -> None:
    text = render_text("{name}. {description}", {"name": "Belt", "description": "Width 2.5 cm, leather."})
    assert text == "Belt. Width 2.5 cm, leather."


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer random BERT with the real MiniLM tokenizer files, saved to a local folder."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    source = Path(resolve_model_path(None))
    folder = tmp_path_factory.mktemp("tiny-bert")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return str(folder)


def test_embed_batch_rows_are_unit_float32(tiny_model: str) -> None:
    model = load_text_model(tiny_model)
    out = embed_batch(model, ["red dress", "", "a much longer description of a pair of shoes"], max_length=32)
    assert out.shape == (3, 32) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_padding_does_not_change_a_text_embedding(tiny_model: str) -> None:
    """Mean pooling masks padding: alone or batched with a long text, the vector is the same."""
    model = load_text_model(tiny_model)
    alone = embed_batch(model, ["blue jeans"])
    batched = embed_batch(model, ["blue jeans", "a long text " * 10])
    assert np.allclose(alone[0], batched[0], atol=1e-5)


def test_length_sorted_batches_return_input_order(tiny_model: str) -> None:
    model = load_text_model(tiny_model)
    texts = ["a " * n + "shirt" for n in (9, 1, 5, 0, 7, 3)]
    together = embed_texts(model, texts, batch_size=2)
    one_by_one = np.vstack([embed_batch(model, [t]) for t in texts])
    assert np.allclose(together, one_by_one, atol=1e-5)


def test_model_id_is_content_derived(tiny_model: str, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    assert model_id(tiny_model, 128) == model_id(str(copy), 128)
    assert model_id(tiny_model, 128) != model_id(tiny_model, 64)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace('"hidden_act": "gelu"', '"hidden_act": "relu"'))
    assert model_id(str(copy), 128) != model_id(tiny_model, 128)


def test_model_id_changes_with_weights_of_the_same_size(tiny_model: str, tmp_path: Path) -> None:
    """Fine-tuned weights keep the file size; the id must still change, or stale vectors are served."""
    copy = tmp_path / "tuned"
    shutil.copytree(tiny_model, copy)
    weights = next(p for p in copy.iterdir() if p.suffix in (".safetensors", ".bin"))
    before = model_id(str(copy), 128)
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])  # the last float32 values of a tensor, flipped in place
    weights.write_bytes(bytes(data))
    assert weights.stat().st_size == len(data)
    assert model_id(str(copy), 128) != before
    assert model_id(str(copy), 128) != model_id(tiny_model, 128)


def test_missing_local_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="text model directory .* does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
