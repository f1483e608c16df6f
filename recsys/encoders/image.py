"""Image embeddings with a torchvision CNN or ViT: pooled features before the classifier, L2-normalised.

No Spark here: decoding, preprocessing, model building, weight loading and batch embedding are
plain PyTorch and Pillow, called by the pandas UDF (:mod:`recsys.inference`), the ``train`` stage
(:mod:`recsys.training`) and the tests.

Weights come from one of (``image.weights`` in config):

- ``torchvision:<NAME>`` (e.g. ``torchvision:IMAGENET1K_V1`` or ``torchvision:DEFAULT``): the
  weights torchvision publishes for the architecture, from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``), downloaded only where the cluster can reach the internet;
- a checkpoint file: a plain ``state_dict`` (torchvision's own ``.pth`` files) or the dict the
  ``train`` stage writes (``{"format": "recsys-image-encoder/1", "arch", "state_dict", ...}``),
  always read with ``torch.load(..., weights_only=True)``;
- ``none``: random initialisation from ``seed`` (tests and smoke runs only: the vectors are
  valid but carry no meaning).

Images are decoded with Pillow, converted to RGB and resized (bilinear) to ``height x width``, then
normalised with the ImageNet mean and standard deviation, which torchvision's published weights
expect (https://pytorch.org/vision/stable/models.html).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CHECKPOINT_FORMAT = "recsys-image-encoder/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The attribute holding each family's classifier; replacing it with Identity leaves the pooled
# features. ConvNeXt's classifier is (LayerNorm2d, Flatten, Linear): only the Linear goes.
_HEADS: tuple[tuple[str, str], ...] = (
    ("resnet", "fc"), ("resnext", "fc"), ("wide_resnet", "fc"), ("regnet", "fc"),
    ("efficientnet", "classifier"), ("mobilenet", "classifier"), ("densenet", "classifier"),
    ("convnext", "classifier.2"), ("vit", "heads"),
)


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; ``str(err)`` is the quarantine reason."""


def head_attribute(arch: str) -> str:
    """The (dotted) attribute of ``arch``'s classifier, e.g. ``fc`` for ResNets.

    Raises:
        ValueError: ``arch`` is not a torchvision classification model of a supported family.
    """
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"image.arch {arch!r} is not a torchvision classification model")
    for prefix, attr in _HEADS:
        if arch.startswith(prefix):
            return attr
    supported = sorted({p for p, _ in _HEADS})
    raise ValueError(f"image.arch {arch!r}: supported families are {supported}")


def _set_attr(model: torch.nn.Module, dotted: str, value: torch.nn.Module) -> None:
    *parents, last = dotted.split(".")
    owner: Any = model
    for name in parents:
        owner = getattr(owner, name)
    if last.isdigit():
        owner[int(last)] = value
    else:
        setattr(owner, last, value)


def build_classifier(arch: str, num_classes: int, height: int = 224) -> torch.nn.Module:
    """A randomly initialised torchvision ``arch`` with a ``num_classes``-way classifier.

    ViTs are built for square ``height``-pixel inputs (their position embeddings fix the size).
    """
    import torchvision

    head_attribute(arch)
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if arch.startswith("vit"):
        kwargs["image_size"] = height
    return torchvision.models.get_model(arch, **kwargs)


def strip_head(model: torch.nn.Module, arch: str) -> torch.nn.Module:
    """Replace the classifier with ``Identity`` (in place): the model then returns pooled features."""
    _set_attr(model, head_attribute(arch), torch.nn.Identity())
    return model


def _head_keys(state: dict[str, torch.Tensor], arch: str) -> list[str]:
    prefix = head_attribute(arch) + "."
    return [k for k in state if k.startswith(prefix)]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``); a bare ``state_dict`` is wrapped.

    Returns:
        ``{"state_dict": ..., **metadata}``; ``arch`` is present for checkpoints this project wrote.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a torch checkpoint holding tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights-only errors all mean "not a usable checkpoint"
        raise ValueError(f"image checkpoint {path} cannot be read safely: {err}") from None
    if isinstance(data, dict) and data.get("format") == CHECKPOINT_FORMAT:
        return dict(data)
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {"state_dict": data}
    raise ValueError(f"image checkpoint {path}: expected a state_dict or a {CHECKPOINT_FORMAT} dict")


def load_backbone(arch: str, weights: str, height: int = 224, seed: int = 0) -> torch.nn.Module:
    """``arch`` without its classifier, with ``weights`` (see the module docstring), in eval mode.

    Raises:
        ValueError: unknown arch, unknown torchvision weights name, or a checkpoint whose
            architecture or tensors do not fit ``arch`` (the message lists the keys).
        FileNotFoundError: a checkpoint path that does not exist.
    """
    import torchvision

    if weights.startswith("torchvision:"):
        name = weights.split(":", 1)[1]
        head_attribute(arch)
        try:
            enum = torchvision.models.get_model_weights(arch)
            chosen = enum.DEFAULT if name == "DEFAULT" else enum[name]
        except KeyError:
            raise ValueError(
                f"image.weights {weights!r}: {arch} has weights {[w.name for w in enum]}"
            ) from None
        model = torchvision.models.get_model(arch, weights=chosen)
        return strip_head(model, arch).eval()
    torch.manual_seed(seed)
    if weights == "none":
        return strip_head(build_classifier(arch, 1000, height), arch).eval()
    checkpoint = read_checkpoint(weights)
    if checkpoint.get("arch", arch) != arch:
        raise ValueError(f"image checkpoint {weights} holds a {checkpoint['arch']}, but image.arch is {arch}")
    state = checkpoint["state_dict"]
    model = strip_head(build_classifier(arch, 1000, int(checkpoint.get("height", height))), arch)
    body = {k: v for k, v in state.items() if k not in set(_head_keys(state, arch))}
    result = model.load_state_dict(body, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"image checkpoint {weights} does not fit {arch}: missing keys {result.missing_keys[:5]}, "
            f"unexpected keys {result.unexpected_keys[:5]}"
        )
    return model.eval()


def model_id(arch: str, weights: str, height: int, width: int, seed: int = 0) -> str:
    """A content-derived id: architecture, weights (a checkpoint's tensor digest) and input size.

    The same checkpoint in two places gives the same id; new weights or a new input size give a
    new one, and so re-embed every image.
    """
    if weights.startswith("torchvision:") or weights == "none":
        tag = weights.replace("torchvision:", "") if weights != "none" else f"random{seed}"
    else:
        tag = state_digest(read_checkpoint(weights)["state_dict"])
    return f"{arch}@{tag}@{height}x{width}"


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """The first 12 hex digits of a sha256 over the tensors' names, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:12]


def decode_image(data: bytes | None, height: int, width: int, max_pixels: int = 50_000_000) -> np.ndarray:
    """Decode image bytes to an RGB ``(height, width, 3)`` uint8 array (bilinear resize).

    The image header is checked before any pixel is decoded, so a decompression bomb is refused
    cheaply; JPEGs are decoded at a reduced scale when that still covers the target size (Pillow
    ``draft``).

    Raises:
        ImageDecodeError: with the reason: empty file, not an image, too many pixels, truncated or
            corrupt data.
    """
    if not data:
        return _fail("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > max_pixels:
                    return _fail(f"too large: {w}x{h} = {w * h:,} pixels > image.max_pixels {max_pixels:,}")
                if w < 1 or h < 1:
                    return _fail(f"bad dimensions {w}x{h}")
                if img.format == "JPEG":
                    img.draft("RGB", (width, height))
                rgb = img.convert("RGB")
                if rgb.size != (width, height):
                    rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
                return np.array(rgb, dtype=np.uint8)  # a writable copy (torch.from_numpy wants one)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        return _fail("not an image: Pillow cannot identify the format")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return _fail(f"too large: {err}")
    except (OSError, SyntaxError, ValueError) as err:
        return _fail(f"corrupt image: {err}")


def _fail(reason: str) -> np.ndarray:
    raise ImageDecodeError(reason)


def to_tensor(images: np.ndarray, device: torch.device | str = "cpu", channels_last: bool = False) -> torch.Tensor:
    """``(n, H, W, 3)`` uint8 → ``(n, 3, H, W)`` float32, ImageNet-normalised, on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


@dataclass
class ImageModel:
    """A feature extractor on one device, with the input size it expects."""

    model: torch.nn.Module
    device: torch.device
    dim: int
    height: int
    width: int
    channels_last: bool


def load_image_model(
    arch: str, weights: str, height: int, width: int, device: str | torch.device = "cpu", seed: int = 0
) -> ImageModel:
    """:func:`load_backbone` on ``device`` (channels-last on CUDA), with its feature size probed."""
    device = torch.device(device)
    model = load_backbone(arch, weights, height, seed).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    with torch.inference_mode():
        probe = model(torch.zeros(1, 3, height, width, device=device))
    return ImageModel(model, device, int(probe.flatten(1).shape[1]), height, width, channels_last)


def embed_batch(model: ImageModel, images: np.ndarray) -> np.ndarray:
    """Embed decoded images: pooled features, L2-normalised.

    Args:
        model: from :func:`load_image_model`.
        images: ``(n, height, width, 3)`` uint8 RGB, as :func:`decode_image` returns.

    Returns:
        ``(n, d)`` float32, rows of unit L2 norm. On CUDA the forward pass runs under bf16 autocast.
    """
    if len(images) == 0:
        return np.zeros((0, model.dim), dtype=np.float32)
    x = to_tensor(images, model.device, model.channels_last)
    with torch.inference_mode():
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
            features = model.model(x)
        features = torch.nn.functional.normalize(features.flatten(1).float(), p=2, dim=1)
    return features.cpu().numpy().astype(np.float32, copy=False)


def embed_images(
    model: ImageModel, blobs: list[bytes | None], batch_size: int = 64, max_pixels: int = 50_000_000
) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Decode and embed many encoded images, in batches; undecodable ones get their reason.

    Returns:
        ``(vectors, errors)``, both of length ``len(blobs)``: ``vectors[i]`` is a ``(d,)`` float32
        unit vector or ``None``; ``errors[i]`` is ``None`` or why image i could not be used.
    """
    vectors: list[np.ndarray | None] = [None] * len(blobs)
    errors: list[str | None] = [None] * len(blobs)
    decoded: list[np.ndarray] = []
    index: list[int] = []

    def flush() -> None:
        if decoded:
            out = embed_batch(model, np.stack(decoded))
            for i, row in zip(index, out):
                vectors[i] = row
            decoded.clear()
            index.clear()

    for i, data in enumerate(blobs):
        try:
            decoded.append(decode_image(data, model.height, model.width, max_pixels))
            index.append(i)
        except ImageDecodeError as err:
            errors[i] = str(err)
        if len(decoded) >= batch_size:
            flush()
    flush()
    return vectors, errors
