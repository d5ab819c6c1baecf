"""The CI workflow as written: `.github/workflows/retrain.yml`'s CI profile names real params that validate, and the
job's own `run:` lines, read from the YAML and run in order on the tiny profile, retrain a fresh project through the
promotion gate and write the decision and the diffs into the job summary.

The runner below does for this job what GitHub's does: each `run:` script goes through `bash --noprofile --norc
-eo pipefail` (the workflow's `shell: bash`) in the checkout, with the workflow's, the job's and the step's `env:`
(every `${{ ... }}` expression empty, as on a fork's pull request: no secrets, no variables), GITHUB_STEP_SUMMARY,
GITHUB_WORKSPACE and CI=true; after a failed step only the `if: always()` steps run. `uses:` steps are GitHub's
actions: the test asserts the ones the scripts rely on and stands in for them (checkout: the project is a git
repository holding the workflow; setup-python: the project's `.venv`, a link to this repository's, already
installed, so that the workflow's `make install` finds it up to date and installs nothing).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import ROOT, TINY_OVERRIDES, copy_project, default_params, make_project, run
from pipeline.config import ConfigError, config_from_dict

WORKFLOW = ROOT / ".github" / "workflows" / "retrain.yml"
JOB = "retrain"
PROFILE = "CI_PROFILE"  # the job's env variable holding the CI profile's `-S key=value` overrides
# The tiny profile in CI_PROFILE's place: the same form, on a project already made tiny, with two values
# smaller still, so that the params diff in the summary has rows.
TINY_PROFILE = "-S sample.count=16 -S evaluate.num_samples=64"
STEP_TIMEOUT = 1800  # seconds; the tiny retrain takes a few minutes on a busy 2-core machine


@dataclass(frozen=True)
class StepRun:
    name: str
    returncode: int
    output: str


def load_workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def job_steps(workflow: dict) -> list[dict]:
    return workflow["jobs"][JOB]["steps"]


def run_steps(workflow: dict) -> list[dict]:
    return [step for step in job_steps(workflow) if "run" in step]


def step_name(step: dict) -> str:
    """Returns the name GitHub shows for a step: its `name:`, else `Run <first line>` or the action."""
    if "name" in step:
        return step["name"]
    return f"Run {step['run'].splitlines()[0]}" if "run" in step else step["uses"]


def without_expressions(env: dict | None) -> dict[str, str]:
    """Returns an `env:` mapping as a job without secrets and variables gets it: every `${{ }}` empty."""
    out = {}
    for key, value in (env or {}).items():
        text = str(value)
        if "${{" in text:
            assert re.fullmatch(r"\$\{\{.*\}\}", text.strip(), re.S), f"{key}: only whole-value expressions"
            text = ""
        out[key] = text
    return out


def run_workflow(workflow: dict, root: Path, env: dict, summary: Path, overrides: dict,
                 steps: list[dict] | None = None) -> list[StepRun]:
    """Returns each `run:` step's outcome after running `steps` (default: the job's) as GitHub would in `root`."""
    job = workflow["jobs"][JOB]
    assert (workflow.get("defaults") or {}).get("run", {}).get("shell") == "bash", \
        "the runner stands in for `shell: bash` (-eo pipefail); GitHub's default shell lacks pipefail"
    base = {**env, **without_expressions(workflow.get("env")), **without_expressions(job.get("env")),
            "CI": "true", "GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(root),
            "GITHUB_STEP_SUMMARY": str(summary), **overrides}
    scripts = summary.parent / "scripts"
    scripts.mkdir(exist_ok=True)
    failed, done = False, []
    for index, step in enumerate(job["steps"] if steps is None else steps):
        condition = step.get("if")
        assert condition in (None, "always()"), f"{step_name(step)}: the runner knows no `if: {condition}`"
        if "uses" in step or (failed and condition != "always()"):
            continue
        for unsupported in ("GITHUB_ENV", "GITHUB_OUTPUT", "GITHUB_PATH"):
            assert unsupported not in step["run"], f"{step_name(step)}: the runner does not pass {unsupported} on"
        script = scripts / f"step{index}.sh"
        script.write_text(step["run"])
        result = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
                                cwd=root / step.get("working-directory", "."),
                                env={**base, **without_expressions(step.get("env"))},
                                capture_output=True, text=True, timeout=STEP_TIMEOUT)
        done.append(StepRun(step_name(step), result.returncode, result.stdout + result.stderr))
        failed = failed or result.returncode != 0
    return done


def ci_project(folder: Path) -> tuple[Path, dict]:
    """Returns (root, env) of a fresh tiny project as the workflow's checkout sees it, its .venv installed."""
    root, env, _ = make_project(folder, TINY_OVERRIDES)
    shutil.copy(ROOT / "Makefile", root / "Makefile")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    shutil.copytree(ROOT / ".github", root / ".github")
    (root / ".venv").symlink_to(ROOT / ".venv", target_is_directory=True)
    # The link is no directory: a `.venv/` pattern would miss it, and an untracked link would reach the experiment;
    # .gitignore's `.venv` covers it, and the exclude keeps it out whatever .gitignore says.
    with open(root / ".git" / "info" / "exclude", "a") as f:
        f.write("/.venv\n")
    # The workflow's `make install` finds the environment installed, as after a first install, and installs
    # nothing: the copy's pyproject.toml is dated before the shared venv's stamp, so it can never rebuild that venv.
    stamp = ROOT / ".venv" / ".installed"
    assert stamp.is_file(), f"no {stamp}: run `make install` once"
    os.utime(root / "pyproject.toml", (stamp.stat().st_mtime - 60, stamp.stat().st_mtime - 60))
    question = subprocess.run(["make", "--question", "install"], cwd=root, env=env, capture_output=True, text=True)
    assert question.returncode == 0, f"make install would rebuild the shared .venv: {question.stdout}{question.stderr}"
    run(["git", "add", "Makefile", "pyproject.toml", ".github"], root, env)
    run(["git", "commit", "-qm", "workflow"], root, env)
    return root, env


def profile_overrides(profile: str) -> dict[str, str]:
    """Returns {key: value text} of a `-S key=value ...` profile, asserting it has that form and nothing else."""
    words = shlex.split(profile)
    assert words and len(words) % 2 == 0 and set(words[0::2]) == {"-S"}, f"not `-S key=value ...`: {profile!r}"
    assert all("=" in word for word in words[1::2]), profile
    return dict(word.split("=", 1) for word in words[1::2])


def apply_profile(params: dict, profile: str) -> dict:
    """Returns `params` with the profile's values (read as YAML, as DVC reads -S values), asserting every key exists."""
    params = json.loads(json.dumps(params))
    for key, text in profile_overrides(profile).items():
        *sections, leaf = key.split(".")
        node = params
        for section in sections:
            assert isinstance(node.get(section), dict), f"{key}: params.yaml has no section {section!r}"
            node = node[section]
        assert leaf in node, f"{key}: params.yaml has no such key; allowed in {'.'.join(sections)}: {', '.join(node)}"
        assert not isinstance(node[leaf], dict), f"{key}: a whole section, not a key"
        node[leaf] = yaml.safe_load(text)
    return params


def ci_profile(workflow: dict) -> str:
    return str(workflow["jobs"][JOB]["env"][PROFILE])


# Fast: the workflow as text.

@pytest.mark.parametrize("which", ["the workflow's", "the test's tiny"])
def test_the_profile_names_only_params_keys_and_the_params_it_makes_validate(which):
    profile = ci_profile(load_workflow()) if which == "the workflow's" else TINY_PROFILE
    params = apply_profile(default_params(), profile)
    try:
        config_from_dict(params)
    except ConfigError as e:
        pytest.fail(f"{which} profile makes invalid params: {e}")


def test_a_profile_key_params_yaml_lacks_fails_the_check():
    with pytest.raises(AssertionError, match="evaluate.classifier_epochs: params.yaml has no such key"):
        apply_profile(default_params(), "-S train.epochs=5 -S evaluate.classifier_epochs=2")


def test_every_run_line_takes_its_params_from_the_profile_variable():
    scripts = [step["run"] for step in run_steps(load_workflow())]
    assert not any(re.search(r"(^|\s)(-S|--set-param)\s", script) for script in scripts), \
        f"params set outside {PROFILE}: the test's tiny profile would not replace them"
    assert sum(f"${PROFILE}" in script or f"${{{PROFILE}}}" in script for script in scripts) == 1


def test_the_actions_the_scripts_rely_on_are_there():
    steps = {step["uses"].split("@")[0]: step for step in job_steps(load_workflow()) if "uses" in step}
    assert steps["actions/checkout"]["with"]["fetch-depth"] == 0  # the summary diffs against the base commit
    assert str(steps["actions/setup-python"]["with"]["python-version"]) == "3.11"
    upload = steps["actions/upload-artifact"]
    assert upload.get("if") == "always()" and "metrics/" in upload["with"]["path"].split()


def test_every_make_target_the_workflow_calls_is_in_the_makefile():
    targets = set(re.findall(r"^([A-Za-z][\w.-]*):", (ROOT / "Makefile").read_text(), re.M))
    called = {target for step in run_steps(load_workflow()) for target in re.findall(r"\bmake\s+([A-Za-z][\w-]*)",
                                                                                   step["run"])}
    assert called and called <= targets, called - targets


# Slow: the workflow's own commands on the tiny profile, in a fresh project.

@pytest.fixture(scope="module")
def retrained(tmp_path_factory):
    """Yields (root, env, step outcomes, summary text, HEAD before) after the whole job on the tiny profile."""
    folder = tmp_path_factory.mktemp("ci")
    root, env = ci_project(folder / "project")
    head = run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    summary = folder / "summary.md"
    steps = run_workflow(load_workflow(), root, env, summary, {PROFILE: TINY_PROFILE})
    yield root, env, steps, summary.read_text() if summary.exists() else "", head


def show(steps: list[StepRun]) -> str:
    return "\n".join(f"--- {s.name}: exit {s.returncode}\n{s.output[-3000:]}" for s in steps)


@pytest.mark.slow
def test_every_step_runs_and_succeeds(retrained):
    _, _, steps, _, _ = retrained
    assert [s.name for s in steps] == [step_name(step) for step in run_steps(load_workflow())], show(steps)
    assert all(s.returncode == 0 for s in steps), show(steps)


@pytest.mark.slow
def test_the_pipeline_ran_to_the_gate_which_made_the_first_version_champion(retrained):
    root, _, steps, _, _ = retrained
    (retrain_step,) = [step for step in run_steps(load_workflow()) if "$" + PROFILE in step["run"]]
    (retrain,) = [s for s in steps if s.name == step_name(retrain_step)]
    stages = list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    for stage in stages:
        assert f"Running stage '{stage}'" in retrain.output, (stage, show(steps))
    assert stages[-1] == "register"
    promotion = json.loads((root / "metrics" / "promotion.json").read_text())
    assert (promotion["decision"], promotion["version"]) == ("champion", 1)  # a new local store: no champion yet


@pytest.mark.slow
def test_the_registry_has_the_version_as_champion(retrained):
    root, *_ = retrained
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    aliases = client.get_registered_model("dcgan-mnist").aliases
    assert {alias: str(version) for alias, version in aliases.items()} == {"champion": "1"}


@pytest.mark.slow
def test_the_summary_has_the_decision_its_reasons_the_store_and_both_diffs(retrained):
    root, _, steps, summary, _ = retrained
    promotion = json.loads((root / "metrics" / "promotion.json").read_text())
    assert "## Promotion: **champion** (registry version 1)" in summary, summary
    assert promotion["reasons"] in summary and "the first version is the champion" in summary
    metrics = summary.split("## Metrics")[1].split("## Parameters")[0]
    assert re.search(r"\|\s*metrics/eval\.json\s*\|\s*fid\s*\|", metrics), summary
    assert re.search(r"\|\s*metrics/promotion\.json\s*\|\s*version\s*\|", metrics), summary
    params = summary.split("## Parameters")[1]
    assert re.search(r"\|\s*params\.yaml\s*\|\s*sample\.count\s*\|\s*32\s*\|\s*16\s*\|", params), summary


@pytest.mark.slow
def test_the_experiment_commits_nothing_on_the_branch_and_leaves_its_params_in_the_workspace(retrained):
    root, env, _, _, head = retrained
    assert run(["git", "rev-parse", "HEAD"], root, env).stdout.strip() == head
    assert yaml.safe_load((root / "params.yaml").read_text())["sample"]["count"] == 16


@pytest.mark.slow
def test_every_path_the_artifact_uploads_exists(retrained):
    root, *_ = retrained
    upload = next(step for step in job_steps(load_workflow()) if step.get("uses", "").startswith("actions/upload"))
    for path in upload["with"]["path"].split():
        assert (root / path).exists(), path


@pytest.mark.slow
def test_with_the_teams_server_the_summary_says_so_and_never_shows_its_credentials(retrained, tmp_path):
    root, env, _, _, _ = retrained
    project = copy_project(root, tmp_path / "project")
    summary = tmp_path / "summary.md"
    secret = "s3cret-Passw0rd"
    uri = f"https://ci-user:{secret}@mlflow.invalid"
    (step,) = [step for step in run_steps(load_workflow()) if step.get("if") == "always()"]
    (done,) = run_workflow(load_workflow(), project, env, summary, {PROFILE: TINY_PROFILE, "MLFLOW_TRACKING_URI": uri},
                           steps=[step])
    assert done.returncode == 0, show([done])
    text = summary.read_text()
    assert "the team's MLflow server" in text and "## Promotion: **champion**" in text
    assert secret not in text and secret not in done.output


@pytest.mark.slow
@pytest.mark.parametrize(("line", "broken", "error"), [
    ("make install", "make no-such-target", "No rule to make target 'no-such-target'"),
    ('make exp ARGS="$CI_PROFILE"', 'make exp ARGS="$CI_PROFILE no-such-stage"', "Stage 'no-such-stage' not found"),
])
def test_a_run_line_calling_a_missing_target_or_stage_fails_its_step_and_the_summary_says_no_decision(
        tmp_path, line, broken, error):
    workflow = load_workflow()
    (step,) = [step for step in run_steps(workflow) if line in step["run"].splitlines()]
    step["run"] = step["run"].replace(line, broken)
    root, env = ci_project(tmp_path / "project")
    summary = tmp_path / "summary.md"
    steps = run_workflow(workflow, root, env, summary, {PROFILE: TINY_PROFILE})
    failed = [s for s in steps if s.returncode != 0]
    assert [s.name for s in failed] == [step_name(step)] and error in failed[0].output, show(steps)
    (summary_step,) = [step for step in run_steps(workflow) if step.get("if") == "always()"]
    assert steps[-1].name == step_name(summary_step) and steps[-1].returncode == 0, show(steps)
    assert "## Promotion: no decision" in summary.read_text()
