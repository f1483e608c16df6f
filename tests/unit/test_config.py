"""Config layering and the errors a user sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.config import ConfigError, load_config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_load_and_are_frozen() -> None:
    cfg = load_config("local")
    assert cfg.knn.k == 12 and cfg.data.source == "fashion_products"
    with pytest.raises(Exception):
        cfg.knn.k = 3  # type: ignore[misc]


def test_env_file_then_set_override_last(tmp_path: Path) -> None:
    env = write(tmp_path / "mine.yaml", "knn:\n  k: 20\ndata:\n  source: hm\n")
    cfg = load_config(env, ["knn.k=30", "fusion.weights={text: 2, metadata: 1}"])
    assert cfg.knn.k == 30
    assert cfg.data.source == "hm"
    # a map merges key by key across layers: the image weight keeps its default
    assert cfg.fusion.weights == {"text": 2.0, "image": 0.5, "metadata": 1.0, "behaviour": 0.5}


def test_out_of_range_names_file_key_and_range(tmp_path: Path) -> None:
    env = write(tmp_path / "local.yaml", "knn:\n  k: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(env)
    assert str(err.value) == f"{env}: knn.k must be >= 1, got 0"


def test_override_error_names_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--set: knn.lsh.bands must be <= 512, got 1000$"):
        load_config("local", ["knn.lsh.bands=1000"])


def test_unknown_key_and_bad_choice_are_rejected(tmp_path: Path) -> None:
    env = write(tmp_path / "x.yaml", "knn:\n  kk: 3\ndata:\n  source: csv\n")
    with pytest.raises(ConfigError) as err:
        load_config(env)
    message = str(err.value)
    assert f"{env}: knn.kk is not a known key" in message
    assert f"{env}: data.source must be one of 'hm' or 'fashion_products', got 'csv'" in message


def test_probe_holdout_must_lie_inside_the_image_encoders_holdout(tmp_path: Path) -> None:
    env = write(tmp_path / "probe.yaml", "quality:\n  holdout: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(env)
    assert str(err.value) == (
        f"{env}: quality.holdout must be <= train.holdout (0.1) while the image encoder is trained here "
        "(image.weights: trained): the probe is scored on product groups the encoder held out, got 0.2"
    )
    assert load_config(env, ["train.holdout=0.25"]).quality.holdout == 0.2
    assert load_config(env, ["image.weights=none"]).quality.holdout == 0.2  # no encoder trained here


def test_template_with_unknown_field_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"text.template uses unknown field\(s\) \['price'\]"):
        load_config("local", ["text.template={name} {price}"])


def test_fusion_needs_a_positive_weight_and_known_modality() -> None:
    with pytest.raises(ConfigError, match="at least one modality needs a weight > 0"):
        load_config("local", ["fusion.weights={text: 0, image: 0, metadata: 0, behaviour: 0}"])
    with pytest.raises(ConfigError, match="modality 'sound' is not one of"):
        load_config("local", ["fusion.weights={sound: 1}"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path / "bad.yaml", "knn: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("local", ["knn.k"])


def test_shipped_configs_are_valid() -> None:
    for env in ("local", "cluster", "hm"):
        load_config(env)


def test_base_yaml_states_exactly_the_model_defaults() -> None:
    """A wheel without conf/ falls back to the models' defaults: they must be base.yaml's."""
    from recsys.config import Config

    assert load_config() == Config()


def test_image_arch_is_checked_against_torchvision() -> None:
    with pytest.raises(ConfigError, match="--set: image.arch .*not a torchvision classification model"):
        load_config("local", ["image.arch=resnet_nonexistent"])
    with pytest.raises(ConfigError, match="supported families"):
        load_config("local", ["image.arch=googlenet"])  # a torchvision model whose head is not handled
    assert load_config("local", ["image.arch=resnet50"]).image.arch == "resnet50"


def test_quality_table_has_one_row_per_modality_fused_first() -> None:
    from recsys.cli import quality_table

    metrics = {
        "neighbours.text.category_precision_at_k": 0.8, "neighbours.text.probe_macro_f1": 0.7,
        "neighbours.fused.category_precision_at_k": 0.9, "neighbours.fused.articles": 100.0,
        "neighbours.image.category_precision_at_k": 0.6, "neighbours.k": 12.0, "embed.text.seconds": 3.0,
    }
    rows = quality_table(metrics)
    assert [r["modality"] for r in rows] == ["fused", "image", "text"]
    assert rows[0]["articles"] == 100 and rows[2]["probe_macro_f1"] == 0.7 and rows[1]["probe_macro_f1"] is None


def test_training_settings_change_with_what_decides_the_weights_only() -> None:
    from recsys.training import training_settings

    base = training_settings(load_config("local"))
    assert training_settings(load_config("local", ["train.epochs=11"])) != base
    assert training_settings(load_config("local", ["image.height=64"])) != base
    # how the run is carried out does not retrain the model
    for same in ("train.workers=1", "train.output_dir=/elsewhere", "train.retrain_on_new_images=true"):
        assert training_settings(load_config("local", [same])) == base, same
