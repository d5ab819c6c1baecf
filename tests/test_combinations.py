"""Every dataset x architecture trains, samples and evaluates end to end through the library.

Fashion-MNIST and CIFAR-10 come from format-identical files on a local HTTP server (see
test_datasets.py), MNIST from the offline subset (mnist_5k).
"""

import numpy as np
import pandas as pd
import pytest

from conftest import merge
from pipeline import paths
from pipeline.config import config_from_dict
from pipeline.data import download_dataset, load_dataset, normalize_dataset
from pipeline.evaluate import evaluate_report, train_classifier
from pipeline.models import load_model
from pipeline.paths import TrainOutputs
from pipeline.sample import write_samples
from pipeline.train import train_gan
from test_datasets import served_cifar, served_fashion  # noqa: F401 (fixtures)

SHAPES = {"mnist_5k": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


@pytest.mark.parametrize("arch", ["dcgan", "mlp", "cdcgan"])
@pytest.mark.parametrize("dataset", ["mnist_5k", "fashion_mnist", "cifar10"])
def test_dataset_and_architecture_train_sample_and_evaluate(dataset, arch, tiny_params, request, tmp_path,
                                                            monkeypatch):
    mirror = None
    if dataset != "mnist_5k":
        mirror, _ = request.getfixturevalue("served_" + dataset.split("_")[0].replace("cifar10", "cifar"))
    config = config_from_dict(merge(tiny_params, {"data": {"name": dataset, "mirror": mirror, "limit": 200},
                                                  "model": {"arch": arch}}))
    monkeypatch.chdir(tmp_path)

    raw_dir = paths.raw_dir(dataset)
    manifest = download_dataset(config.data, raw_dir)
    splits = normalize_dataset(*load_dataset(raw_dir, manifest), config.data, config.seed)
    train, holdout = splits["train"], splits["holdout"]
    assert train[0].shape[1:] == SHAPES[dataset]
    classifier, _ = train_classifier(config, train, holdout)
    gan, history, fid_history = train_gan(config, *train, classifier, TrainOutputs(tmp_path), verbose=0)
    assert np.isfinite(history[["d_loss", "g_loss"]].to_numpy()).all()

    generators = {"best": load_model(paths.GENERATOR_BEST), "last": gan.generator}
    images = write_samples(generators["best"], config, paths.SAMPLES_NPZ, paths.SAMPLES_GRID,
                           paths.SAMPLES_INTERPOLATION)
    assert images.shape == (config.sample.count, *SHAPES[dataset]) and images.dtype == np.uint8

    result = evaluate_report(config, generators, classifier, train, holdout, pd.read_csv(paths.FID_HISTORY),
                             paths.REPORT)
    assert np.isfinite(result["fid"]) and paths.REPORT.exists()
    assert ("conditional_accuracy" in result) == (arch == "cdcgan")
