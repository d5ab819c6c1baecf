"""What the MLflow UI shows, in a real browser: headless Chromium (Debian's, driven by Playwright) on the pages
of a real `mlflow server` on 127.0.0.1 that one tiny `dvc repro` logged into.

This is also the lifecycle's one run against a tracking server instead of an SQLite file (tests/test_registry.py
has the rest): the run, its artifacts (which the server stores in its own folder) and the registered model
with its `champion` alias all go over HTTP.

Needs Chromium on PATH (`make browser`, which `make test` runs first, installs Debian's package) and Playwright
(the test extras); without either, these tests fail and say how to install it. A page test that fails saves a
screenshot in its tmp_path and gives the path in a warning.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections import Counter
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from conftest import TINY_OVERRIDES, make_project, merge, mlflow_server, run

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the browser fixture fails, saying how to install it
    expect = sync_playwright = None

# Every test here needs the module's real `dvc repro` and server.
pytestmark = pytest.mark.slow

NAME = "dcgan-mnist"
# Two epochs, so that the per-epoch FID chart is a line through two points, not a lone dot.
OVERRIDES = merge(TINY_OVERRIDES, {"train": {"epochs": 2}})
# The UI renders in seconds, but this machine is shared: generous waits, which cost nothing when it is quick.
PAGE_TIMEOUT_MS = 60_000
SERVER_START_S = 180
# The section in which MLflow's UI shows the metrics that have no `<prefix>/`.
UNGROUPED = "Model metrics"
CHROMIUM_MISSING = ("Chromium is not installed (no `chromium` on PATH). `make browser` installs Debian's, and "
                    "`make test` runs it first; by hand, as root: apt-get install chromium")
PLAYWRIGHT_MISSING = ("Playwright is not installed: it is in the test extras, `make install` or "
                      "`.venv/bin/pip install -e '.[test]'` (its own browser download is not needed)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Yields (URL, folder) of a real `mlflow server` on 127.0.0.1: SQLite store and artifacts in the folder."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    with mlflow_server(folder, SERVER_START_S) as url:
        yield url, folder


@pytest.fixture(scope="module")
def project(server):
    """The tiny project after `dvc repro` into the server: root, env, its run, the server's URL and folder."""
    url, folder = server
    root, env, dvc = make_project(folder.parent / "project", OVERRIDES)
    env["MLFLOW_TRACKING_URI"] = url
    run([dvc, "repro"], root, env)
    ids = json.loads((root / "models/mlflow_run.json").read_text())
    return SimpleNamespace(root=root, url=url, artifacts=folder / "artifacts", run_id=ids["run_id"],
                           experiment_id=ids["experiment_id"])


@pytest.fixture(scope="module")
def client(project) -> MlflowClient:
    return MlflowClient(tracking_uri=project.url, registry_uri=project.url)


@pytest.fixture(scope="module")
def browser():
    """Yields headless Debian Chromium under Playwright; fails, saying how to install them, if either is missing."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail(CHROMIUM_MISSING, pytrace=False)
    if sync_playwright is None:
        pytest.fail(PLAYWRIGHT_MISSING, pytrace=False)
    expect.set_options(timeout=PAGE_TIMEOUT_MS)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, request, tmp_path):
    """Yields a fresh page, wide enough for the run page's side panels; a screenshot in tmp_path if the test fails."""
    context = browser.new_context(viewport={"width": 1600, "height": 1200})
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = context.new_page()
    failed_before = request.session.testsfailed  # counts this test's failure before its teardown runs
    yield page
    if request.session.testsfailed > failed_before:
        path = tmp_path / "page.png"
        page.screenshot(path=path)
        warnings.warn(f"{request.node.name}: the page at the failure is in {path} ({page.url})")
    context.close()


def run_page(project, tab: str = "") -> str:
    """Returns the UI's address of the project's run, on `tab` (e.g. model-metrics) or its overview."""
    return f"{project.url}/#/experiments/{project.experiment_id}/runs/{project.run_id}" + (f"/{tab}" if tab else "")


def test_repro_against_a_tracking_server_makes_its_generator_version_1_and_the_champion(project, client):
    promotion = json.loads((project.root / "metrics/promotion.json").read_text())
    assert (promotion["version"], promotion["decision"]) == (1, "champion"), promotion
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.version == "1" and champion.run_id == project.run_id
    assert client.get_registered_model(NAME).aliases == {"champion": "1"}
    assert client.get_run(project.run_id).data.tags["promotion.decision"] == "champion"


def test_the_run_artifacts_are_in_the_server_folder_and_no_store_is_in_the_project(project, client):
    assert client.get_run(project.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")
    logged = project.artifacts / project.experiment_id / project.run_id / "artifacts"
    assert (logged / "metrics/eval.json").is_file() and (logged / "registry").is_dir()
    assert not (project.root / "mlflow.db").exists() and not (project.root / "mlruns").exists()


def test_the_model_metrics_tab_shows_one_section_per_metric_prefix(page, project, client):
    metrics = client.get_run(project.run_id).data.metrics
    expected = Counter(key.rpartition("/")[0] or UNGROUPED for key in metrics)
    assert set(expected) == {"train", "eval", "eval/class_count", "promotion"}, sorted(metrics)

    page.goto(run_page(project, "model-metrics"))
    headers = page.get_by_test_id("experiment-view-compare-runs-section-header")
    for section in expected:
        expect(headers.filter(has_text=re.compile(rf"^{re.escape(section)}\s*\("))).to_be_visible()
    shown = {}
    for text in headers.all_inner_texts():  # e.g. "eval\n(32)\nAdd chart"
        name, count = re.match(r"\s*(.+?)\s*\((\d+)\)", text).groups()
        shown[name] = int(count)
    assert shown.pop(UNGROUPED, 0) == 0, "metrics outside every section"
    assert shown == expected


def test_the_model_metrics_tab_draws_the_fid_of_every_epoch_as_a_line(page, project, client):
    epochs = [m.step for m in client.get_metric_history(project.run_id, "train/fid")]
    assert epochs == [1, 2]

    page.goto(run_page(project, "model-metrics"))
    # The charts of a section are drawn only once scrolled into view: the search shows this one alone.
    page.get_by_placeholder("Search metric charts").fill("train/fid")
    chart = page.get_by_test_id("experiment-view-compare-runs-card").filter(
        has=page.locator('h4[title="train/fid"]'))
    expect(chart).to_be_visible()
    expect(chart).to_contain_text("Step")
    line = chart.locator("path.js-line").first  # Plotly's line trace: "M x,y L x,y ..." through every point
    expect(line).to_have_attribute("d", re.compile(r"^M[\d.,-]+(L[\d.,-]+)+$"))
    assert len(re.findall(r"[ML]", line.get_attribute("d"))) == len(epochs)


def test_the_run_overview_shows_the_training_dataset_with_its_digest(page, project, client):
    (dataset_input,) = client.get_run(project.run_id).inputs.dataset_inputs
    dataset = dataset_input.dataset
    manifest = json.loads((project.root / "data/raw/mnist/manifest.json").read_text())
    assert dataset.name == "mnist-offline-subset" and manifest["sha256"].startswith(dataset.digest)

    page.goto(run_page(project))
    shown = page.get_by_role("button", name=f"{dataset.name} ({dataset.digest})")
    expect(shown).to_be_visible()
    expect(shown).to_contain_text("training", ignore_case=True)  # its context, capitalized by CSS


def test_the_registered_model_page_marks_version_1_champion(page, project):
    page.goto(f"{project.url}/#/models/{NAME}")
    version = page.get_by_test_id("model-version-table").get_by_role("row").filter(has_text="Version 1")
    alias = version.locator('[role="status"][title="champion"]')  # version tags are titled by their key
    expect(alias).to_be_visible()
    expect(alias).to_have_text(re.compile(r"@\s*champion"))


def test_the_registered_model_page_shows_its_description(page, project, client):
    description = client.get_registered_model(NAME).description
    assert description
    page.goto(f"{project.url}/#/models/{NAME}")
    # Rendered as Markdown: `code` loses its backticks.
    opening = " ".join(description.replace("`", "").split())[:60]
    expect(page.get_by_test_id("note-editor-preview-content")).to_contain_text(opening)
