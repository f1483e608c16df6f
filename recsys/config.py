"""Typed, frozen configuration: ``conf/base.yaml``, then ``conf/<env>.yaml``, then ``--set`` overrides.

Every value is validated before Spark starts. An error names the file that set the key, the key
and the allowed range, e.g. ``conf/local.yaml: knn.k must be >= 1, got 0``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

__all__ = ["Config", "ConfigError", "load_config", "parse_override", "CONF_DIR"]

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MODALITIES = ("text", "image", "metadata", "behaviour")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names file, key and range."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SparkConfig(_Section):
    master: str = "local[*]"
    app_name: str = "recsys"
    driver_memory: str = Field("4g", pattern=r"^\d+[kmgt]$")
    shuffle_partitions: int = Field(8, ge=1, le=100_000)
    warehouse_dir: str = "spark-warehouse"
    delta_from_pip: bool = True
    conf: dict[str, str] = Field(default_factory=dict)


class DataConfig(_Section):
    source: Literal["hm", "fashion_products"] = "fashion_products"
    path: str = "data/sample/fashion"
    database: str = Field("recsys", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class IngestConfig(_Section):
    max_deletion_share: float = Field(0.05, ge=0.0, le=1.0)
    allow_mass_deletion: bool = False


class TextConfig(_Section):
    enabled: bool = True
    model: str | None = None
    template: str = "{name}. {category_l3}, {category_l2}. {colour}. {description}"
    batch_size: int = Field(64, ge=1, le=4096)
    max_length: int = Field(128, ge=8, le=512)
    arrow_batch_size: int = Field(1000, ge=1, le=100_000)
    torch_threads: int = Field(0, ge=0, le=256)

    @field_validator("template")
    @classmethod
    def _known_fields(cls, value: str) -> str:
        from recsys.sources.schema import TEMPLATE_FIELDS, template_fields

        unknown = sorted(set(template_fields(value)) - set(TEMPLATE_FIELDS))
        if unknown:
            raise ValueError(
                f"uses unknown field(s) {unknown}; allowed: {sorted(TEMPLATE_FIELDS)}"
            )
        return value


class MetadataConfig(_Section):
    enabled: bool = True
    columns: tuple[str, ...] = ("category_l1", "category_l2", "category_l3", "colour")
    attributes: tuple[str, ...] = ()
    column_weights: dict[str, float] = Field(default_factory=dict)

    @field_validator("column_weights")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for key, weight in value.items():
            if weight <= 0:
                raise ValueError(f"weight of {key!r} must be > 0, got {weight}")
        return value


class ImageConfig(_Section):
    enabled: bool = True
    arch: str = "mobilenet_v3_small"
    weights: str = "trained"
    height: int = Field(128, ge=16, le=1024)
    width: int = Field(96, ge=16, le=1024)
    batch_size: int = Field(64, ge=1, le=4096)
    arrow_batch_size: int = Field(256, ge=1, le=100_000)
    torch_threads: int = Field(0, ge=0, le=256)
    max_pixels: int = Field(50_000_000, ge=1)
    seed: int = 42

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        from recsys.encoders.image import head_attribute

        head_attribute(value)
        return value

    @field_validator("weights")
    @classmethod
    def _weights_form(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be 'trained', 'none', 'torchvision:<NAME>' or a checkpoint path")
        return value


class TrainConfig(_Section):
    enabled: bool = True
    label: Literal["category_l1", "category_l2", "category_l3"] = "category_l2"
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(64, ge=2, le=4096)
    learning_rate: float = Field(0.002, gt=0, le=10)
    weight_decay: float = Field(0.05, ge=0, le=10)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    class_weight_power: float = Field(0.5, ge=0, le=1)
    holdout: float = Field(0.1, gt=0, lt=1)
    min_class_count: int = Field(50, ge=1)
    max_images: int = Field(0, ge=0)
    workers: int = Field(2, ge=1, le=64)
    output_dir: str | None = None
    seed: int = 42
    retrain_on_new_images: bool = False


class QualityConfig(_Section):
    label: Literal["category_l1", "category_l2", "category_l3"] = "category_l2"
    probe_max_iter: int = Field(50, ge=0, le=10_000)
    probe_max_articles: int = Field(20_000, ge=100)
    holdout: float = Field(0.1, gt=0, lt=1)


class FusionConfig(_Section):
    weights: dict[str, float] = Field(
        default_factory=lambda: {"text": 1.0, "image": 0.5, "metadata": 0.5, "behaviour": 0.5}
    )

    @field_validator("weights")
    @classmethod
    def _known_modalities(cls, value: dict[str, float]) -> dict[str, float]:
        for key, weight in value.items():
            if key not in MODALITIES:
                raise ValueError(f"modality {key!r} is not one of {list(MODALITIES)}")
            if weight < 0:
                raise ValueError(f"weight of {key!r} must be >= 0, got {weight}")
        if not any(w > 0 for w in value.values()):
            raise ValueError("at least one modality needs a weight > 0")
        return value


class LSHConfig(_Section):
    hash: Literal["kmeans", "srp"] = "kmeans"
    bands: int = Field(1, ge=1, le=512)
    probes: int = Field(20, ge=1, le=4096)
    target_bucket_size: int = Field(60, ge=2, le=1_000_000)
    bits_per_band: int = Field(0, ge=0, le=40)
    max_bucket_size: int = Field(4000, ge=2, le=1_000_000)
    sample_size: int = Field(25_000, ge=10, le=10_000_000)
    iterations: int = Field(8, ge=1, le=100)
    seed: int = 42


class MLlibConfig(_Section):
    bucket_length: float = Field(0.0, ge=0.0)
    bucket_length_factor: float = Field(1.0, gt=0.0)
    num_hash_tables: int = Field(3, ge=1, le=1000)
    threshold: float = Field(0.0, ge=0.0, le=2.0)
    min_cosine: float = Field(0.5, ge=-1.0, le=1.0)
    seed: int = 42


class KNNConfig(_Section):
    k: int = Field(12, ge=1, le=1000)
    backend: Literal["lsh", "exact", "mllib"] = "lsh"
    lsh: LSHConfig = LSHConfig()
    mllib: MLlibConfig = MLlibConfig()
    modalities: tuple[str, ...] = ("fused", "text", "image", "metadata", "behaviour")
    recall_sample: int = Field(500, ge=0, le=100_000)
    block_size: int = Field(2048, ge=16, le=65_536)
    exact_block_rows: int = Field(25_000, ge=16, le=10_000_000)
    refit_share: float = Field(0.1, ge=0.0, le=1.0)
    refit_days: int = Field(30, ge=0, le=100_000)
    recompute: bool = False
    driver_update_mb: int = Field(1024, ge=0, le=1_000_000)

    @field_validator("modalities")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if name != "fused" and name not in MODALITIES:
                raise ValueError(f"{name!r} is not 'fused' or one of {list(MODALITIES)}")
        return value


class BehaviourConfig(_Section):
    enabled: bool = True
    min_purchases: int = Field(2, ge=1, le=1_000_000)
    rank: int = Field(32, ge=2, le=1024)
    max_iter: int = Field(15, ge=1, le=200)
    reg_param: float = Field(0.1, ge=0.0)
    alpha: float = Field(10.0, gt=0.0)
    seed: int = 42
    refit_days: int = Field(7, ge=0, le=100_000)


class CustomersConfig(_Section):
    enabled: bool = True
    k: int = Field(12, ge=1, le=1000)
    history_days: int = Field(365, ge=1, le=100_000)
    half_life_days: float = Field(30.0, gt=0.0)
    max_seeds: int = Field(20, ge=1, le=10_000)
    similar_weight: float = Field(1.0, ge=0.0)
    repurchase_weight: float = Field(1.0, ge=0.0)
    popular_days: int = Field(7, ge=1, le=100_000)
    popular_weight: float = Field(0.05, ge=0.0)


class EvaluateConfig(_Section):
    enabled: bool = True
    validation_days: int = Field(7, ge=1, le=10_000)
    copurchase_days: int = Field(7, ge=0, le=10_000)
    leave_one_out: bool = True
    each_modality: bool = True
    report_dir: str = "reports"
    tsne_sample: int = Field(3000, ge=0, le=100_000)
    strips: int = Field(8, ge=0, le=1000)
    seed: int = 42


class MaintainConfig(_Section):
    enabled: bool = True
    optimize: bool = True
    vacuum: bool = True
    retention_hours: int = Field(168, ge=0, le=100_000)
    tables: list[str] = Field(default_factory=list)

    @field_validator("tables")
    @classmethod
    def _known_tables(cls, value: list[str]) -> list[str]:
        if not value:
            return value
        from recsys.tables import ALL_TABLES

        known = [spec.name for spec in ALL_TABLES]
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(f"unknown table(s) {unknown}; tables are {known}")
        return value


class Config(_Section):
    """The whole run configuration. Sections mirror ``conf/base.yaml``."""

    spark: SparkConfig = SparkConfig()
    data: DataConfig = DataConfig()
    ingest: IngestConfig = IngestConfig()
    text: TextConfig = TextConfig()
    image: ImageConfig = ImageConfig()
    train: TrainConfig = TrainConfig()
    metadata: MetadataConfig = MetadataConfig()
    fusion: FusionConfig = FusionConfig()
    knn: KNNConfig = KNNConfig()
    quality: QualityConfig = QualityConfig()
    behaviour: BehaviourConfig = BehaviourConfig()
    customers: CustomersConfig = CustomersConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    maintain: MaintainConfig = MaintainConfig()

    @field_validator("quality")
    @classmethod
    def _probe_scores_on_groups_the_encoder_held_out(cls, value: QualityConfig, info: ValidationInfo) -> QualityConfig:
        """The probe's held-out product groups lie inside the image encoder's (same hash and seed,
        :func:`recsys.training.holdout_column`), so it never scores articles the encoder trained on."""
        image, train = info.data.get("image"), info.data.get("train")
        if not (isinstance(image, ImageConfig) and isinstance(train, TrainConfig)):
            return value  # a section failed its own validation; that error is reported
        if image.weights == "trained" and train.enabled and value.holdout > train.holdout:
            raise ValueError(
                f"quality.holdout must be <= train.holdout ({train.holdout}) while the image encoder is "
                "trained here (image.weights: trained): the probe is scored on product groups the encoder "
                f"held out, got {value.holdout}"
            )
        return value


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one ``--set a.b=c`` override into a key path and a YAML-typed value.

    Raises:
        ConfigError: if ``item`` has no ``=`` or an empty key.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. knn.k=20")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. a template with braces): the plain string
    return key.strip().split("."), value


def _merge(
    into: dict[str, Any], layer: Mapping[str, Any], origin: str, origins: dict[str, str], prefix: str = ""
) -> None:
    for key, value in layer.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value, origin, origins, f"{path}.")
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value
            origins[path] = origin


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top, got {type(data).__name__}")
    return data


def _describe(error: Mapping[str, Any]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    bounds = {
        "greater_than_equal": ">= {ge}",
        "greater_than": "> {gt}",
        "less_than_equal": "<= {le}",
        "less_than": "< {lt}",
    }
    if kind in bounds:
        return "must be " + bounds[kind].format(**ctx)
    if kind == "extra_forbidden":
        return "is not a known key"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}"
    return str(error["msg"]).removeprefix("Value error, ")


def load_config(
    env: str | Path | None = None,
    overrides: Iterable[str] = (),
    base: str | Path | None = None,
) -> Config:
    """Load ``base.yaml``, then the environment file, then ``--set`` overrides, and validate.

    Args:
        env: an environment name (``local`` → ``conf/local.yaml``) or a path to a YAML file;
            ``None`` for the base file alone.
        overrides: ``KEY=VALUE`` strings (``knn.k=20``); values are parsed as YAML.
        base: the base file; defaults to ``conf/base.yaml`` next to the package.

    Returns:
        The frozen, validated :class:`Config`.

    Raises:
        ConfigError: a file is missing or not YAML, or a value is unknown or out of range; the
            message names the file (or ``--set``), the key and the allowed range.
    """
    base_path = Path(base) if base else CONF_DIR / "base.yaml"
    if base is None and not base_path.is_file():
        # installed from a wheel (spark-submit --py-files): conf/ is not beside the package;
        # the models' defaults are base.yaml's (a unit test keeps the two equal)
        layers: list[tuple[str, dict[str, Any]]] = [("defaults", {})]
    else:
        layers = [(str(base_path), _read_yaml(base_path))]
    if env is not None:
        env_path = Path(env)
        if env_path.suffix not in (".yaml", ".yml"):
            candidates = [base_path.parent / f"{env}.yaml", Path("conf") / f"{env}.yaml"]
            env_path = next((c for c in candidates if c.is_file()), candidates[0])
        layers.append((str(env_path), _read_yaml(env_path)))
    set_layer: dict[str, Any] = {}
    for item in overrides:
        keys, value = parse_override(item)
        node = set_layer
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    layers.append(("--set", set_layer))

    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for origin, layer in layers:
        _merge(merged, layer, origin, origins)
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        lines = []
        for error in err.errors():
            key = ".".join(str(part) for part in error["loc"])
            described = _describe(error)
            if described.startswith(f"{key}."):  # a check across keys names its own key and value
                key = described.split(" ", 1)[0]
            origin = next((origins[k] for k in _prefixes(key) if k in origins), str(base_path))
            if described.startswith(f"{key} "):
                lines.append(f"{origin}: {described}")
                continue
            got = "" if error["type"] == "extra_forbidden" else f", got {error.get('input')!r}"
            lines.append(f"{origin}: {key} {described}{got}")
        raise ConfigError("\n".join(lines)) from None


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def default_env() -> str:
    """The environment name from ``RECSYS_ENV`` (default ``local``)."""
    return os.environ.get("RECSYS_ENV", "local")
