"""The image encoder without Spark: decoding (every kind of bad file), weights loading, embedding."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recsys.encoders.image import (
    CHECKPOINT_FORMAT,
    ImageDecodeError,
    build_classifier,
    decode_image,
    embed_batch,
    embed_images,
    load_backbone,
    load_image_model,
    model_id,
    strip_head,
)
from recsys.training import augment, macro_f1
from tests.conftest import REPO

ARCH = "mobilenet_v3_small"
SAMPLE_IMAGES = sorted((REPO / "data" / "sample" / "fashion" / "images").glob("*.jpg"))


def jpeg(width: int = 60, height: int = 80, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "JPEG")
    return buf.getvalue()


def png(mode: str, size: tuple[int, int] = (30, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def test_decode_resizes_to_rgb_uint8() -> None:
    real = SAMPLE_IMAGES[0].read_bytes()
    for data in (real, jpeg(), png("RGBA"), png("L"), png("P")):
        image = decode_image(data, 32, 24)
        assert image.shape == (32, 24, 3) and image.dtype == np.uint8
    assert decode_image(jpeg(colour=(200, 30, 30)), 8, 8)[4, 4, 0] > 150  # the pixels, not zeros


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (None, "empty file"),
        (b"%PDF-1.4 not an image at all", "not an image"),
        (SAMPLE_IMAGES[0].read_bytes()[:400], "corrupt image"),  # truncated JPEG
        (SAMPLE_IMAGES[0].read_bytes()[:200] + bytes(2000), "corrupt image"),  # garbage after the header
        (jpeg(400, 400), "too large"),  # 160,000 pixels > max_pixels below
    ],
    ids=["zero-bytes", "none", "wrong-format", "truncated", "garbage", "too-many-pixels"],
)
def test_bad_images_raise_with_their_reason(data: bytes | None, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data, 32, 24, max_pixels=100_000)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, "PNG")  # 400 Mpx, about 50 kB compressed
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(buf.getvalue(), 32, 24)


def test_embed_images_reports_bad_rows_and_embeds_the_rest() -> None:
    model = load_image_model(ARCH, "none", 64, 48, seed=1)
    blobs = [SAMPLE_IMAGES[0].read_bytes(), b"", SAMPLE_IMAGES[1].read_bytes(), b"junk"]
    vectors, errors = embed_images(model, blobs, batch_size=2)
    assert [v is None for v in vectors] == [False, True, False, True]
    assert errors[0] is None and "empty" in str(errors[1]) and "not an image" in str(errors[3])
    stacked = np.stack([vectors[0], vectors[2]])
    assert stacked.dtype == np.float32 and stacked.shape == (2, model.dim)
    assert np.allclose(np.linalg.norm(stacked, axis=1), 1.0, atol=1e-5)
    single = embed_batch(model, decode_image(blobs[2], 64, 48)[None])
    assert np.allclose(single[0], vectors[2], atol=1e-5)  # batching does not change a vector


def test_random_weights_follow_the_seed() -> None:
    x = np.stack([decode_image(p.read_bytes(), 64, 48) for p in SAMPLE_IMAGES[:3]])
    a = embed_batch(load_image_model(ARCH, "none", 64, 48, seed=3), x)
    b = embed_batch(load_image_model(ARCH, "none", 64, 48, seed=3), x)
    c = embed_batch(load_image_model(ARCH, "none", 64, 48, seed=4), x)
    assert np.array_equal(a, b) and not np.allclose(a, c)


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


def test_plain_state_dict_checkpoint_loads_and_drops_the_classifier(tmp_path: Path) -> None:
    torch.manual_seed(7)
    source = build_classifier(ARCH, 1000)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = load_backbone(ARCH, str(path))
    expected = strip_head(source, ARCH)
    x = torch.randn(2, 3, 64, 48)
    assert torch.allclose(_features(loaded, x), _features(expected, x))


def test_trained_checkpoint_format_loads_with_any_class_count(tmp_path: Path) -> None:
    torch.manual_seed(8)
    source = build_classifier(ARCH, 5)
    path = tmp_path / "trained.pt"
    torch.save(
        {"format": CHECKPOINT_FORMAT, "arch": ARCH, "height": 64, "width": 48, "classes": list("abcde"),
         "state_dict": source.state_dict()},
        path,
    )
    x = torch.randn(2, 3, 64, 48)
    assert torch.allclose(_features(load_backbone(ARCH, str(path)), x), _features(strip_head(source, ARCH), x))
    with pytest.raises(ValueError, match="holds a mobilenet_v3_small, but image.arch is resnet18"):
        load_backbone("resnet18", str(path))


def test_torchvision_weights_name_reads_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    weights = torchvision.models.get_model_weights(ARCH).IMAGENET1K_V1
    torch.manual_seed(9)
    published = build_classifier(ARCH, 1000)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(published.state_dict(), cache / Path(weights.url).name)  # what a download would leave
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    loaded = load_backbone(ARCH, "torchvision:IMAGENET1K_V1")
    x = torch.randn(1, 3, 64, 48)
    assert torch.allclose(_features(loaded, x), _features(strip_head(published, ARCH), x))
    assert model_id(ARCH, "torchvision:IMAGENET1K_V1", 64, 48) == f"{ARCH}@IMAGENET1K_V1@64x48"
    with pytest.raises(ValueError, match="has weights"):
        load_backbone(ARCH, "torchvision:NO_SUCH_WEIGHTS")


def test_bad_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(ARCH, str(tmp_path / "missing.pt"))
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"payload": object()}, unsafe)  # a pickled object weights_only refuses
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_backbone(ARCH, str(unsafe))
    other = tmp_path / "resnet.pth"
    torch.save(build_classifier("resnet18", 10).state_dict(), other)
    with pytest.raises(ValueError, match="does not fit mobilenet_v3_small: missing keys"):
        load_backbone(ARCH, str(other))
    with pytest.raises(ValueError, match="not a torchvision classification model"):
        load_backbone("resnet_nonexistent", "none")


def test_model_id_is_content_derived(tmp_path: Path) -> None:
    torch.manual_seed(10)
    state = build_classifier(ARCH, 3).state_dict()
    for name in ("a.pt", "b.pt"):
        torch.save(state, tmp_path / name)
    same = {model_id(ARCH, str(tmp_path / n), 64, 48) for n in ("a.pt", "b.pt")}
    assert len(same) == 1
    assert model_id(ARCH, str(tmp_path / "a.pt"), 96, 48) not in same  # input size is part of it
    torch.save(build_classifier(ARCH, 3).state_dict(), tmp_path / "c.pt")  # new random weights
    assert model_id(ARCH, str(tmp_path / "c.pt"), 64, 48) not in same


def test_macro_f1_matches_a_hand_computed_case() -> None:
    truth = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2])
    # class 0: tp 2 fp 0 fn 1 -> 0.8; class 1: tp 1 fp 1 fn 1 -> 0.5; class 2: tp 1 fp 1 fn 0 -> 2/3
    score, per_class = macro_f1(truth, predicted)
    assert per_class == pytest.approx({0: 0.8, 1: 0.5, 2: 2 / 3})
    assert score == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # a class only ever predicted counts (F1 0), as in scikit-learn's macro average
    assert macro_f1(np.array([0, 0]), np.array([0, 3]))[0] == pytest.approx((2 / 3 + 0) / 2)


def test_augmentation_is_seeded_and_keeps_each_image_a_shifted_or_mirrored_crop() -> None:
    images = np.random.default_rng(0).integers(0, 255, size=(8, 32, 24, 3), dtype=np.uint8)
    first = augment(images, np.random.default_rng(42))
    assert first.shape == images.shape and first.dtype == np.uint8
    assert np.array_equal(first, augment(images, np.random.default_rng(42)))  # same seed, same batch: same result
    assert not np.array_equal(first, augment(images, np.random.default_rng(43)))
    pad = 32 // 16
    for original, out in zip(images, first):
        padded = np.pad(original, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        crops = [padded[t : t + 32, l : l + 24] for t in range(2 * pad + 1) for l in range(2 * pad + 1)]
        assert any(np.array_equal(out, c) or np.array_equal(out, c[:, ::-1]) for c in crops)
