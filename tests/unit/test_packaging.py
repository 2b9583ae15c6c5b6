"""The Dockerfile and the GitHub workflows: linted, and checked against the pin and the CLI.

No Docker engine and no GitHub here: the linters come from the venv (the dev extras), and the
quantize workflow's shell steps run under bash with a fake `docker` first on PATH.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from udquant import cli, toolchain
from udquant.dispatch.base import default_image, make_request
from udquant.dispatch.job_command import build_job_args, build_workflow_inputs
from udquant.resolve import REPO_ID

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKERFILE = ROOT / "Dockerfile"
WORKFLOW_DIR = ROOT / ".github" / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.yml"))
QUANTIZE = WORKFLOW_DIR / "quantize.yml"

FAKE_TOKEN = "hf_test-fake-token-not-real"
RESULT_LINE = "https://huggingface.co/owner/Distill-UD-GGUF"
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def linter(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN}; install the dev extras: pip install -e '.[dev]'")
    return str(path)


def run_linter(argv: list[str]) -> None:
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{Path(argv[0]).name} found problems:\n{done.stdout}{done.stderr}"


def load_workflow(path: Path) -> dict:
    # YAML 1.1 reads the key `on` as True; the tests only look at jobs and inputs.
    return yaml.safe_load(path.read_text())


def workflow_triggers(workflow: dict) -> dict:
    return workflow.get("on", workflow.get(True))


def all_steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def step_named(workflow: dict, name: str) -> dict:
    return next(step for step in all_steps(workflow) if step.get("name") == name)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword:
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_arg_defaults() -> dict[str, str]:
    defaults = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def read_pin_env() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (ROOT / "scripts" / "llama-cpp-pin.env").read_text().splitlines()
             if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def job_option_strings() -> set[str]:
    parser = argparse.ArgumentParser()
    cli.add_job_arguments(parser)
    return {option for action in parser._actions for option in action.option_strings}


# --- linters -------------------------------------------------------------------------------


def test_hadolint_passes_the_dockerfile():
    run_linter([linter("hadolint"), "--no-color", str(DOCKERFILE)])


def test_actionlint_passes_every_workflow():
    assert {path.name for path in WORKFLOWS} >= {"ci.yml", "image.yml", "quantize.yml", "recipes.yml"}
    # With shellcheck, actionlint also checks every run: script.
    run_linter([linter("actionlint"), "-oneline", "-no-color", "-shellcheck", linter("shellcheck"),
                "-pyflakes", "", *map(str, WORKFLOWS)])


def test_every_workflow_matches_the_vendored_schema():
    run_linter([linter("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)])


def test_shellcheck_passes_the_scripts():
    run_linter([linter("shellcheck"), "-x", *(str(p.relative_to(ROOT)) for p in sorted(ROOT.glob("scripts/*.sh")))])


def test_every_action_is_pinned_to_a_version_tag():
    for path in WORKFLOWS:
        for step in all_steps(load_workflow(path)):
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w./-]+@v\d+(\.\d+)*", step["uses"]), f"{path.name}: {step['uses']}"


# --- the image -----------------------------------------------------------------------------


def test_dockerfile_pins_the_same_llama_cpp_as_the_job():
    assert dockerfile_arg_defaults()["LLAMA_CPP_TAG"] == read_pin_env()["LLAMA_CPP_TAG"] == toolchain.PINNED_TAG


def test_the_build_makes_the_tools_the_job_runs():
    assert read_pin_env()["LLAMA_CPP_TOOLS"].strip('"').split() == list(toolchain.TOOLS)


def test_dockerfile_builds_llama_cpp_through_the_build_script():
    runs = [rest for keyword, rest in dockerfile_instructions() if keyword == "RUN"]
    build = [" ".join(rest.split()) for rest in runs if "scripts/build-toolchain.sh" in rest]
    assert build == ['scripts/build-toolchain.sh --from git --cuda --cuda-arch "$CUDA_ARCHITECTURES" '
                     '--prefix /opt/llama.cpp --jobs "${BUILD_JOBS:-$(nproc)}"']
    assert dockerfile_arg_defaults()["CUDA_ARCHITECTURES"] == "80-real;86-real;89-real;90"
    envs = " ".join(rest for keyword, rest in dockerfile_instructions() if keyword == "ENV")
    assert "UDQUANT_LLAMA_CPP=/opt/llama.cpp" in envs.split()
    stages = [rest for keyword, rest in dockerfile_instructions() if keyword == "FROM"]
    assert stages == ["nvidia/cuda:12.8.1-devel-ubuntu24.04 AS builder", "nvidia/cuda:12.8.1-runtime-ubuntu24.04"]


def test_dockerfile_copies_every_script_the_build_runs():
    build_script = (ROOT / "scripts" / "build-toolchain.sh").read_text()
    needed = {"scripts/build-toolchain.sh", "scripts/llama-cpp-pin.env"}
    needed |= {f"scripts/{name}" for name in re.findall(r'"\$here/([\w.-]+)"', build_script)}
    assert {"scripts/check-compiler.sh", "scripts/check-toolchain.sh"} <= needed
    copied = {path for keyword, rest in dockerfile_instructions() if keyword == "COPY" for path in rest.split()[:-1]}
    assert needed <= copied


def test_image_versions_follow_the_project():
    defaults = dockerfile_arg_defaults()
    assert defaults["UDQUANT_VERSION"] == pyproject()["project"]["version"]
    # One CPU torch across the Makefile, CI and the image.
    makefile_torch = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert makefile_torch and defaults["TORCH_VERSION"] == makefile_torch.group(1)
    assert f"torch=={defaults['TORCH_VERSION']}" in (WORKFLOW_DIR / "ci.yml").read_text()


def test_the_default_image_is_the_one_image_yml_pushes():
    """dispatch runs IMAGE_REPOSITORY:<version>; image.yml pushes <owner>/udquant-job:<version> on a v<version> tag."""
    (meta,) = [step for step in load_workflow(WORKFLOW_DIR / "image.yml")["jobs"]["image"]["steps"]
               if step.get("id") == "meta"]
    pushed = meta["with"]["images"].replace("${{ github.repository_owner }}", "udquant")
    assert default_image() == f"{pushed}:{pyproject()['project']['version']}"
    assert "type=semver,pattern={{version}}" in meta["with"]["tags"]


def test_image_entrypoint_is_the_job_console_script():
    entrypoints = [rest for keyword, rest in dockerfile_instructions() if keyword == "ENTRYPOINT"]
    assert [json.loads(rest) for rest in entrypoints] == [["udquant-job"]]
    target = pyproject()["project"]["scripts"]["udquant-job"]
    module, _, function = target.partition(":")
    assert module == "udquant.cli" and callable(getattr(cli, function))


def test_no_secret_in_any_image_layer():
    names = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG":
            names.append(rest.partition("=")[0])
        elif keyword == "ENV":
            names += [pair.partition("=")[0] for pair in rest.split() if "=" in pair]
    assert names and not [n for n in names if re.search(r"TOKEN|SECRET|PASSW|API_?KEY|CREDENTIAL", n, re.I)]
    users = [rest for keyword, rest in dockerfile_instructions() if keyword == "USER"]
    assert users and users[-1].partition(":")[0] not in ("0", "root")


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies():
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "the build context is an allowlist"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = set()
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert source in allowed, f"COPY {source} is excluded by .dockerignore"
                assert (ROOT / source).exists()
                copied.add(source.rstrip("/"))
    assert allowed == copied, f"let in but never copied: {sorted(allowed - copied)}"


# --- the quantize workflow -----------------------------------------------------------------


RUN_CONTEXT = {"run_id": "4242", "run_attempt": "1"}  # the github context of the run the tests play


def expand(value: object, inputs: dict[str, object], secrets: dict[str, str], steps: dict[str, str],
           context: dict[str, str] | None = None) -> str:
    """An env: value as GitHub renders it, for the expressions these workflows use."""
    def render(match: re.Match[str]) -> str:
        scope, _, name = match.group(1).partition(".")
        if scope == "github":
            return (context or RUN_CONTEXT)[name]
        if scope == "inputs":
            given = inputs[name]
            return str(given).lower() if isinstance(given, bool) else str(given)
        if scope == "secrets":
            return secrets.get(name, "")
        if scope == "steps":
            return steps[name]
        raise AssertionError(f"the test does not render ${{{{ {match.group(1)} }}}}")

    return EXPRESSION.sub(render, str(value))


# Plays the client and the daemon: `run` records its argv; its container (the --name, listed in
# `containers`) outlives the client when FAKE_DOCKER_KILLED is set, as when the runner kills the
# client on a cancel. `container inspect`, `stop` and `rm` answer as the daemon and the current CLI
# do (rm --force of a missing container prints the error and exits 0); FAKE_DOCKER_DOWN: no daemon.
FAKE_DOCKER = """#!/usr/bin/env bash
containers="$FAKE_DOCKER_DIR/containers"
touch "$containers"
name=${!#}
if [ "$1" != run ]; then
  echo "$*" >> "$FAKE_DOCKER_DIR/calls"  # one line each: no argument here holds a space
  if [ -n "${FAKE_DOCKER_DOWN-}" ]; then
    echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?" >&2
    exit 1
  fi
fi
known() { grep -qxF -- "$name" "$containers"; }
case "$1" in
  run)
    printf '%s\\0' "$@" > "$FAKE_DOCKER_DIR/argv"
    printf '%s' "${HF_TOKEN-<unset>}" > "$FAKE_DOCKER_DIR/token"
    name=""
    for ((i = 1; i < $#; i++)); do
      [ "${!i}" = --name ] && { j=$((i + 1)); name=${!j}; }
    done
    if [ -n "${FAKE_DOCKER_KILLED-}" ]; then
      echo "$name" >> "$containers"
      exit 137
    fi
    echo "some result line"
    echo "$FAKE_DOCKER_RESULT" ;;
  container)  # container inspect [--format F] NAME
    known || { echo "Error response from daemon: No such container: $name" >&2; exit 1; }
    echo running ;;
  stop)
    known || { echo "Error response from daemon: No such container: $name" >&2; exit 1; }
    echo "$name" ;;
  rm)
    if ! known; then
      echo "Error response from daemon: No such container: $name" >&2
      exit 0
    fi
    grep -vxF -- "$name" "$containers" > "$containers.new" || true
    mv "$containers.new" "$containers"
    echo "$name" ;;
  *) echo "fake docker: unexpected $1" >&2; exit 2 ;;
esac
"""


def fake_docker_calls(tmp_path: Path) -> list[str]:
    """The fake docker's calls other than run, one line each."""
    calls = tmp_path / "calls"
    return calls.read_text().splitlines() if calls.exists() else []


def run_step(step: dict, tmp_path: Path, inputs: dict[str, object], secrets: dict[str, str] | None = None,
             steps: dict[str, str] | None = None, context: dict[str, str] | None = None,
             extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one step's script the way `shell: bash` does, with the runner's variables, the job's env:
    and a fake docker."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    docker = fake_bin / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    defaults = {name: spec.get("default", "") for name, spec in
                workflow_triggers(load_workflow(QUANTIZE))["workflow_dispatch"]["inputs"].items()}
    env = {
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "LANG": "C.UTF-8",
        "GITHUB_REPOSITORY": "Owner/UdQuant", "GITHUB_REPOSITORY_OWNER": "Owner", "GITHUB_WORKSPACE": str(ROOT),
        "RUNNER_TEMP": str(tmp_path),
        "GITHUB_OUTPUT": str(tmp_path / "output"), "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "FAKE_DOCKER_DIR": str(tmp_path), "FAKE_DOCKER_RESULT": RESULT_LINE,
    }
    job_env = load_workflow(QUANTIZE)["jobs"]["quantize"].get("env", {})
    for key, value in {**job_env, **step.get("env", {})}.items():
        env[key] = expand(value, {**defaults, **inputs}, secrets or {}, steps or {}, context)
    env.update(extra_env or {})
    script = tmp_path / "step.sh"
    script.write_text(step["run"])
    assert step.get("shell") == "bash", "steps run with bash -eo pipefail"
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
                          env=env, capture_output=True, text=True, timeout=60)


def docker_argv(tmp_path: Path) -> list[str]:
    return (tmp_path / "argv").read_text().split("\0")[:-1]


def split_docker_run(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """docker's own options, the image, and the arguments for the job."""
    assert argv[0] == "run"
    image_at = next(i for i, arg in enumerate(argv) if arg.startswith("ghcr.io/"))
    return argv[1:image_at], argv[image_at], argv[image_at + 1:]


def parse_job_args(job_args: list[str]) -> argparse.Namespace:
    unknown = {arg for arg in job_args if arg.startswith("-")} - job_option_strings()
    assert not unknown, f"quantize.yml passes options the job does not have: {sorted(unknown)}"
    parser = argparse.ArgumentParser(exit_on_error=False)
    cli.add_job_arguments(parser)
    return parser.parse_args(job_args)


def test_quantize_defaults_reach_the_job(tmp_path):
    workflow = load_workflow(QUANTIZE)
    assert workflow["jobs"]["quantize"]["runs-on"] == ["self-hosted", "linux", "x64", "gpu"]
    done = run_step(step_named(workflow, "Run the job"), tmp_path, {"repo": "owner/Distill-7B"},
                    {"HF_TOKEN": FAKE_TOKEN})
    assert done.returncode == 0, done.stderr
    docker_options, image, job_args = split_docker_run(docker_argv(tmp_path))
    assert image == "ghcr.io/owner/udquant-job:latest"
    assert {"--rm", "--init", "--gpus", "all", "udquant-data:/data"} <= set(docker_options)
    # No --quant: the job makes UD-Q5_K_XL, or a named recipe's own level.
    assert job_args == ["owner/Distill-7B", "--imatrix", "compute", "--upload"]
    args = parse_job_args(job_args)
    assert (args.source, args.levels, args.imatrix, args.upload) == ("owner/Distill-7B", None, "compute", True)
    assert done.stdout.splitlines()[-1] == RESULT_LINE


def test_quantize_inputs_reach_the_job(tmp_path):
    inputs = {"repo": "owner/Distill-7B", "levels": " UD-Q4_K_XL ", "imatrix": "none",
              "recipe": "recipes/generic/UD-Q4_K_XL.yaml", "private": True, "eval": True, "image-tag": "0.1.0"}
    done = run_step(step_named(load_workflow(QUANTIZE), "Run the job"), tmp_path, inputs)
    assert done.returncode == 0, done.stderr
    docker_options, image, job_args = split_docker_run(docker_argv(tmp_path))
    assert image == "ghcr.io/owner/udquant-job:0.1.0"
    assert f"{ROOT}/recipes/generic/UD-Q4_K_XL.yaml:/run/udquant/recipe.yaml:ro" in docker_options
    assert "--private" in job_args
    args = parse_job_args(job_args)
    assert args.levels == ["UD-Q4_K_XL"]
    assert (args.imatrix, str(args.recipe)) == ("none", "/run/udquant/recipe.yaml")
    assert (args.private, args.evaluate) == (True, True)
    public = run_step(step_named(load_workflow(QUANTIZE), "Run the job"), tmp_path,
                      {**inputs, "levels": "UD-Q5_K_XL  UD-Q4_K_XL", "private": False, "eval": False,
                       "recipe": "auto"})
    assert public.returncode == 0
    _, _, job_args = split_docker_run(docker_argv(tmp_path))
    assert "--private" not in job_args and "--eval" not in job_args
    args = parse_job_args(job_args)
    assert (args.recipe, args.levels, args.private, args.evaluate) == ("auto", ["UD-Q5_K_XL", "UD-Q4_K_XL"], False,
                                                                         False)
    library = run_step(step_named(load_workflow(QUANTIZE), "Run the job"), tmp_path,
                       {**inputs, "levels": "", "recipe": "qwen35/UD-Q5_K_XL"})
    assert library.returncode == 0
    args = parse_job_args(split_docker_run(docker_argv(tmp_path))[2])
    assert (args.recipe, args.levels) == ("qwen35/UD-Q5_K_XL", None)  # the recipe's own level


@pytest.mark.parametrize("repo", [
    "owner/Distill-7B", "a/b", "Org_1/name.v2-GGUF", "owner/x--y", "owner/../x", "../etc", "owner/name.git",
    "owner", "a/b/c", "-rf/x", "owner/name; rm -rf ~", "$(id)/x", "owner/`id`", "owner/name\n--private",
    "owner/" + "x" * 96, "owner/" + "x" * 95, "", "owner/name-", "owner/name.", "owner/name_", "owner-/name",
])
def test_quantize_accepts_exactly_the_repo_ids_the_job_does(tmp_path, repo):
    done = run_step(step_named(load_workflow(QUANTIZE), "Check the inputs"), tmp_path, {"repo": repo})
    job_accepts = bool(REPO_ID.fullmatch(repo)) and not repo.endswith(".git")
    assert (done.returncode == 0) == job_accepts, done.stdout + done.stderr


@pytest.mark.parametrize(("inputs", "ok"), [
    ({"levels": "UD-Q5_K_XL UD-Q4_K_XL"}, True),
    ({"levels": "UD-Q5_K_XL --private"}, False),
    ({"levels": "  "}, True),  # none: the recipe's own level
    ({"imatrix": "/data/imatrix/Distill.imatrix.gguf"}, True),
    ({"imatrix": "/etc/passwd"}, False),
    ({"imatrix": "/data/../etc/passwd"}, False),
    ({"imatrix": "--help"}, False),
    ({"imatrix": "auto"}, True),
    ({"recipe": "recipes/generic/UD-Q5_K_XL.yaml"}, True),
    ({"recipe": "qwen35/UD-Q5_K_XL"}, True),
    ({"recipe": "recipes/generic/missing.yaml"}, False),
    ({"recipe": "../outside.yaml"}, False),
    ({"recipe": "qwen35/../../x"}, False),
    ({"recipe": "--help"}, False),
    ({"image-tag": "0.1.0"}, True),
    ({"image-tag": "latest --privileged"}, False),
])
def test_quantize_checks_the_other_inputs(tmp_path, inputs, ok):
    done = run_step(step_named(load_workflow(QUANTIZE), "Check the inputs"), tmp_path, {"repo": "o/n", **inputs})
    assert (done.returncode == 0) == ok, done.stdout + done.stderr


def test_quantize_writes_the_result_to_the_summary(tmp_path):
    workflow = load_workflow(QUANTIZE)
    assert run_step(step_named(workflow, "Run the job"), tmp_path, {"repo": "o/n"}).returncode == 0
    summary = step_named(workflow, "Summary")
    assert summary.get("if") == "always()"
    assert run_step(summary, tmp_path, {"repo": "o/n"}, steps={"job.outcome": "success"}).returncode == 0
    assert f"Result: {RESULT_LINE}" in (tmp_path / "summary.md").read_text().splitlines()
    (tmp_path / "summary.md").unlink()
    assert run_step(summary, tmp_path, {"repo": "o/n"}, steps={"job.outcome": "failure"}).returncode == 0
    assert "Result:" not in (tmp_path / "summary.md").read_text()


def docker_option(argv: list[str], option: str) -> str:
    docker_options, _, _ = split_docker_run(argv)
    assert docker_options.count(option) == 1, f"{option} in {docker_options}"
    return docker_options[docker_options.index(option) + 1]


def test_quantize_removes_the_container_a_cancel_leaves_running(tmp_path):
    """Cancelling the run (or timeout-minutes) kills the docker client, not the container the daemon runs:
    a step that runs even then removes the container by the name the run step gave it."""
    workflow = load_workflow(QUANTIZE)
    cleanup = step_named(workflow, "Remove the container")
    assert cleanup.get("if") in ("always()", "cancelled()")
    names = [step.get("name") for step in all_steps(workflow)]
    assert names.index("Remove the container") > names.index("Run the job")
    # The job step's own limit comes first, so that the removal runs before the job's limit ends everything.
    assert step_named(workflow, "Run the job")["timeout-minutes"] < workflow["jobs"]["quantize"]["timeout-minutes"]
    killed = run_step(step_named(workflow, "Run the job"), tmp_path, {"repo": "o/n"}, {"HF_TOKEN": FAKE_TOKEN},
                      extra_env={"FAKE_DOCKER_KILLED": "1"})
    assert killed.returncode == 137
    name = docker_option(docker_argv(tmp_path), "--name")
    assert name == "udquant-4242-1"
    assert (tmp_path / "containers").read_text().split() == [name]  # the daemon still runs it
    done = run_step(cleanup, tmp_path, {"repo": "o/n"}, {"HF_TOKEN": FAKE_TOKEN})
    assert done.returncode == 0, done.stdout + done.stderr
    assert fake_docker_calls(tmp_path) == [f"container inspect --format {{{{.State.Status}}}} {name}",
                                           f"stop --time 30 {name}", f"rm --force {name}",
                                           f"container inspect {name}"]
    assert (tmp_path / "containers").read_text().split() == []
    assert f"removed the container {name}" in done.stdout
    assert FAKE_TOKEN not in done.stdout + done.stderr


def test_quantize_container_names_differ_between_runs_and_attempts(tmp_path):
    step = step_named(load_workflow(QUANTIZE), "Run the job")
    seen = set()
    for context in ({"run_id": "4242", "run_attempt": "1"}, {"run_id": "4242", "run_attempt": "2"},
                    {"run_id": "4243", "run_attempt": "1"}):
        assert run_step(step, tmp_path, {"repo": "o/n"}, context=context).returncode == 0
        seen.add(docker_option(docker_argv(tmp_path), "--name"))
    assert len(seen) == 3


def test_quantize_container_removal_tolerates_an_ended_container(tmp_path):
    workflow = load_workflow(QUANTIZE)
    cleanup = step_named(workflow, "Remove the container")
    assert run_step(step_named(workflow, "Run the job"), tmp_path, {"repo": "o/n"}).returncode == 0
    ended = run_step(cleanup, tmp_path, {"repo": "o/n"})  # --rm has removed it: the daemon knows no such container
    assert ended.returncode == 0, ended.stdout + ended.stderr
    assert fake_docker_calls(tmp_path) == ["container inspect --format {{.State.Status}} udquant-4242-1"]
    assert "already ended" in ended.stdout and "::warning::" not in ended.stdout
    assert "removed" not in ended.stdout  # `docker rm -f` would have exited 0 here too
    down = run_step(cleanup, tmp_path, {"repo": "o/n"}, extra_env={"FAKE_DOCKER_DOWN": "1"})
    assert down.returncode == 0  # a warning, not a failure of a run whose job may have succeeded
    assert "::warning::could not look at the container udquant-4242-1; the GPU may still be busy: Cannot " \
           "connect to the Docker daemon" in down.stdout


def test_quantize_queues_every_dispatch_for_a_model():
    """Without `queue: max` GitHub keeps one pending run per group and cancels it for a newer one."""
    concurrency = load_workflow(QUANTIZE)["concurrency"]
    assert concurrency["group"] == "quantize-${{ inputs.repo }}"
    assert concurrency.get("queue") == "max"
    assert not concurrency.get("cancel-in-progress", False)  # `queue` requires it false or unset


def test_quantize_hands_the_token_to_the_container_by_name_only(tmp_path):
    workflow = load_workflow(QUANTIZE)
    done = run_step(step_named(workflow, "Run the job"), tmp_path, {"repo": "o/n"}, {"HF_TOKEN": FAKE_TOKEN})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "token").read_text() == FAKE_TOKEN
    argv = docker_argv(tmp_path)
    assert argv[argv.index("-e") + 1] == "HF_TOKEN"
    assert not [arg for arg in argv if FAKE_TOKEN in arg]
    summary = run_step(step_named(workflow, "Summary"), tmp_path, {"repo": "o/n"}, {"HF_TOKEN": FAKE_TOKEN},
                       {"job.outcome": "success"})
    outputs = [done.stdout, done.stderr, summary.stdout, summary.stderr, (tmp_path / "summary.md").read_text()]
    assert not [text for text in outputs if FAKE_TOKEN in text]


def test_quantize_never_echoes_the_token():
    workflow = load_workflow(QUANTIZE)
    for step in all_steps(workflow):
        script = step.get("run", "")
        assert not re.search(r"\bset\s+(-\w*x|-o\s+xtrace)", script), f"{step.get('name')}: tracing prints secrets"
        for line in script.splitlines():
            if "HF_TOKEN" in line:
                assert not re.search(r"\b(echo|printf|cat|tee|printenv|env|declare|export)\b", line), line
    holders = [step.get("name") for step in all_steps(workflow) if "HF_TOKEN" in step.get("env", {})]
    assert holders == ["Run the job"], "only the step that starts the container sees the token"
    assert "HF_TOKEN" not in workflow.get("env", {}) and "HF_TOKEN" not in workflow["jobs"]["quantize"].get("env", {})


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_no_expression_is_interpolated_into_a_script(path):
    # Inputs and secrets reach scripts through env: only, so their text is never parsed as shell.
    for step in all_steps(load_workflow(path)):
        for expression in EXPRESSION.findall(step.get("run", "")):
            assert not re.match(r"(inputs|secrets|github\.event)\b", expression), f"{step.get('name')}: {expression}"


def test_ci_caches_the_toolchain_by_its_pin():
    workflow = load_workflow(WORKFLOW_DIR / "ci.yml")
    cache = next(step for step in all_steps(workflow) if step.get("uses", "").startswith("actions/cache@"))
    assert cache["with"]["path"] == ".cache/llama.cpp"
    assert "hashFiles('scripts/llama-cpp-pin.env', 'scripts/build-toolchain.sh')" in cache["with"]["key"]
    assert any(step.get("run") == "make test" for step in all_steps(workflow))


# The python3 of each Ubuntu release the image may be built on.
UBUNTU_PYTHON = {"ubuntu22.04": "3.10", "ubuntu24.04": "3.12"}


def test_ci_runs_the_unit_tests_on_the_images_python():
    bases = {rest.split()[0].rpartition("-")[2] for keyword, rest in dockerfile_instructions() if keyword == "FROM"}
    (ubuntu,) = bases
    versions = {step["with"]["python-version"] for step in all_steps(load_workflow(WORKFLOW_DIR / "ci.yml"))
                if step.get("uses", "").startswith("actions/setup-python@")}
    assert UBUNTU_PYTHON[ubuntu] in versions


def test_dispatched_inputs_are_declared_and_mean_the_same_to_the_job(tmp_path):
    """`udquant dispatch --backend github` and the workflow agree: every input it sends is declared
    (GitHub refuses others) and the job receives what the other backends would pass."""
    request = make_request("owner/Distill-7B", None, levels=["UD-Q5_K_XL", "UD-Q4_K_XL"], imatrix="none",
                           private=True, evaluate=True)
    inputs = build_workflow_inputs(request)
    declared = workflow_triggers(load_workflow(QUANTIZE))["workflow_dispatch"]["inputs"]
    assert set(inputs) <= set(declared)
    typed = {key: value == "true" if declared[key].get("type") == "boolean" else value
             for key, value in inputs.items()}
    done = run_step(step_named(load_workflow(QUANTIZE), "Run the job"), tmp_path, typed)
    assert done.returncode == 0, done.stderr
    _, image, job_args = split_docker_run(docker_argv(tmp_path))
    assert image.endswith(f":{inputs['image-tag']}")
    received, direct = parse_job_args(job_args), parse_job_args(build_job_args(request)[1:])
    for option in ("source", "levels", "recipe", "imatrix", "private", "evaluate", "upload"):
        assert getattr(received, option) == getattr(direct, option), option


# --- the Space ---------------------------------------------------------------------------------
def test_space_installs_this_release_with_the_space_extra():
    """The Space dispatches this release's image, so it must run this release's code and pins."""
    lines = [line.strip() for line in (ROOT / "space" / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    project = pyproject()["project"]
    assert f"udquant @ git+https://github.com/udquant/udquant@v{project['version']}" in lines
    assert set(project["optional-dependencies"]["space"]) <= set(lines)
    header = (ROOT / "space" / "README.md").read_text().split("---")[1]
    card = yaml.safe_load(header)
    gradio_pin = next(dep for dep in project["optional-dependencies"]["space"] if dep.startswith("gradio"))
    assert gradio_pin.endswith(f"=={card['sdk_version']}")
    assert card["app_file"] == "app.py" and (ROOT / "space" / card["app_file"]).is_file()
