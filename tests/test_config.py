"""params.yaml is loaded once into typed config; every bad input names its key."""

import pytest

from conftest import ROOT, default_params, merge
from pipeline.config import Config, ConfigError, config_from_dict, load_config, to_flat_dict


def test_repository_params_load_into_typed_config():
    config = load_config(ROOT / "params.yaml")
    assert isinstance(config, Config)
    assert config.data.name == "mnist"
    assert config.train.lr == 8e-4 and config.train.beta_1 == 0.5
    assert isinstance(config.model.generator_filters, tuple)


def test_flat_dict_names_every_leaf_with_dotted_keys():
    flat = to_flat_dict(load_config(ROOT / "params.yaml"))
    assert flat["train.lr"] == 8e-4
    assert flat["data.limit"] is None
    assert flat["model.generator_filters"] == [128, 64, 32]
    assert "train" not in flat


def _without(section: str, key: str) -> dict:
    params = default_params()
    del params[section][key]
    return params


BAD_PARAMS = [
    ({"train": {"epochs": 0}}, "train.epochs: 0 is out of range; allowed values: >= 1"),
    ({"train": {"epochs": "ten"}}, "train.epochs: expected an integer, got 'ten' (str)"),
    ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer, got 2.5 (float)"),
    ({"train": {"batch_size": -64}}, "train.batch_size: -64 is out of range; allowed values: >= 1"),
    ({"train": {"lr": "2e-4"}}, "train.lr: expected a number, got '2e-4' (str) (YAML reads 2e-4 as text"),
    ({"train": {"lr": 0.0}}, "train.lr: 0.0 is out of range; allowed values: > 0.0 and <= 1.0"),
    ({"train": {"beta_1": 1.5}}, "train.beta_1: 1.5 is out of range; allowed values: <= 1.0"),
    ({"train": {"latent_dim": True}}, "train.latent_dim: expected an integer, got True (bool)"),
    ({"train": {"learning_rate": 0.1}}, "train.learning_rate: unknown key; allowed keys in train: epochs,"),
    ({"data": {"name": "imagenet"}}, "data.name: 'imagenet' is not supported; allowed values: mnist"),
    ({"data": {"limit": 0}}, "data.limit: 0 is out of range; allowed values: >= 1"),
    ({"data": {"offline_fallback": "yes"}}, "data.offline_fallback: expected true or false, got 'yes' (str)"),
    ({"data": {"holdout_fraction": 0.0}}, "data.holdout_fraction: 0.0 is out of range; allowed values: > 0.0"),
    ({"data": None}, "data: expected a mapping of keys, got None (NoneType)"),
    ({"model": {"generator_filters": []}}, "model.generator_filters: expected a non-empty list, got [] (list)"),
    ({"model": {"generator_filters": [64]}}, "model.generator_filters: needs at least 2 entries"),
    ({"model": {"discriminator_filters": [64, -1]}}, "model.discriminator_filters[1]: -1 is out of range"),
    ({"model": {"dropout": 1.0}}, "model.dropout: 1.0 is out of range; allowed values: <= 0.9"),
    ({"sample": {"count": 0}}, "sample.count: 0 is out of range; allowed values: >= 1"),
    ({"evaluate": {"num_samples": "all"}}, "evaluate.num_samples: expected an integer, got 'all' (str)"),
    ({"seed": -1}, "seed: -1 is out of range; allowed values: >= 0"),
    ({"extra": 1}, "extra: unknown key; allowed keys in params.yaml: seed, generator, data, model"),
    ({"generator": "first"}, "generator: 'first' is not supported; allowed values: best, last"),
    ({"classifier": {"lr": -0.1}}, "classifier.lr: -0.1 is out of range; allowed values: > 0.0 and <= 1.0"),
    ({"evaluate": {"precision_recall_k": 0}}, "evaluate.precision_recall_k: 0 is out of range; allowed values: >= 1"),
    ({"train": {"loss": "wasserstein"}}, "train.loss: 'wasserstein' is not supported; allowed values: bce, hinge"),
    ({"train": {"augment": ["translation", "flip"]}},
     "train.augment[1]: 'flip' is not supported; allowed values: color, translation, cutout"),
    ({"train": {"augment": []}}, "train.augment: expected a non-empty list, got [] (list)"),
    ({"train": {"d_lr": 0.0}}, "train.d_lr: 0.0 is out of range; allowed values: > 0.0 and <= 1.0"),
    ({"train": {"loss": "hinge", "label_smoothing": 0.1}}, "train.label_smoothing: 0.1 smooths the targets of the bce"),
]


@pytest.mark.parametrize("overrides, message", BAD_PARAMS, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD_PARAMS)])
def test_bad_value_is_refused_with_a_message_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        config_from_dict(merge(default_params(), overrides))
    assert message in str(error.value)


def test_missing_key_is_named():
    with pytest.raises(ConfigError, match=r"^train\.latent_dim: missing key$"):
        config_from_dict(_without("train", "latent_dim"))


def test_missing_section_is_named():
    params = default_params()
    del params["evaluate"]
    with pytest.raises(ConfigError, match=r"^evaluate: missing key$"):
        config_from_dict(params)


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=f"{path} is not valid YAML"):
        load_config(path)


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read params file .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
