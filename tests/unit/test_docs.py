"""The docs' commands: every command in a ```bash block of docs/*.md or README.md (and every command-looking line
of an unlabeled block) is either run here, or matched by an entry of COVERED that names the test or CI step
running it, or says why nothing here can (and which test checks the files it uses). Links between the pages
point at files and headings that exist.

Commands run here are the quick ones (`aha --help`, `aha validate ...`, `aha make-tiny-model ...`), in a
scratch folder that links to the repository's deploy/; a `# exits N` comment states the expected exit status,
and a ```text block right after a run command holds lines it must print."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]

# Commands executed by this test, by pattern of the command line (comments stripped).
RUN = [
    r"aha --help",
    r"aha [\w-]+ --help",
    r"aha validate \S+\.yaml( \S+=\S+)*( --no-check-files)?",
    r"aha make-tiny-model \S+",
]
SLOW_RUN = [r"aha convert-smollm2 \S+"]  # runs here too, in the slow set (it writes a 0.5 GB model)

# Commands not run here: pattern -> (the file that runs or checks it, which must exist; why).
COVERED: dict[str, tuple[str, str]] = {
    r"bash scripts/demo\.sh( .*)?": (
        "tests/integration/test_demo_learns.py",
        "runs the demo's job (slow, in CI); the setup step the script starts with runs in every CI run "
        "through scripts/test.sh",
    ),
    r"bash scripts/test\.sh( .*)?": (".ci/run", "CI runs exactly this"),
    r"aha run \S+( \S+=\S+)* --resume": (
        "tests/integration/test_resume.py",
        "kills `python -m aha.cluster.cli run` and resumes the run",
    ),
    r"aha run \S+( \S+=\S+)* --resume auto": (
        "tests/integration/test_restarts.py",
        "kills a driver mid-run, continues its run with --resume auto, then finds it finished and refuses "
        "another job's config (each case of the folder: tests/unit/test_restarts.py)",
    ),
    r"aha cleanup \S+": (
        "tests/integration/test_restarts.py",
        "kills a driver with SIGKILL, runs `aha cleanup` on its run folder and checks that no process of the "
        "run survives (a live driver refused: tests/unit/test_restarts.py)",
    ),
    r"aha run \S+( \S+=\S+)* --overwrite": (
        "tests/unit/test_config_preflight.py",
        "checks what --overwrite replaces and that a plain rerun refuses a finished run (the run itself: "
        "tests/integration/test_run.py)",
    ),
    r"aha export \S+ --to \S+( --push-to-hub \S+)?": (
        "tests/unit/test_export.py",
        "exports a finished run's folder and uploads it up to huggingface_hub's call (no network here)",
    ),
    r"aha run \S+( \S+=\S+)*": (
        "tests/integration/test_submit.py",
        "the submitted job's entrypoint is `aha run`",
    ),
    r"aha generate \S+( \S+=\S+)*( --resume)?": ("tests/integration/test_generate.py", "runs `aha generate`"),
    r"aha submit \S+( \S+=\S+)* --address \S+( --\S+( \S+)?)*": (
        "tests/integration/test_submit.py",
        "submits to a real `ray start --head` cluster",
    ),
    r"aha (status|logs|stop) \S+ --address \S+": ("tests/integration/test_submit.py", "runs each verb"),
    r"ray job (logs|status) (--follow )?\S+ --address \S+": (
        "tests/integration/test_submit.py",
        "runs `ray job logs --follow` against the test cluster",
    ),
    r"ray start --head( --\S+)*": (
        "tests/integration/test_submit.py",
        "starts a head with explicit ports and a private --temp-dir",
    ),
    r"ray start --address=\S+ '--resources=\{.*\}'": (
        "tests/integration/test_multinode.py",
        "starts nodes with such custom resources (Ray's own multi-node test utility, same raylet options) and "
        "runs a job pinned to them",
    ),
    r"bash scripts/gpu_check\.sh": (
        "tests/unit/test_device.py",
        "runs it on this GPU-less machine: one JSON line saying it skipped; the GPU run itself is manual",
    ),
    r"python -m aha\.cluster\.reference > docs/configuration\.md": (
        "tests/unit/test_config.py",
        "regenerates the reference and compares it with the committed file",
    ),
    r"python deploy/grafana/dashboard\.py > deploy/grafana/aha-dashboard\.json": (
        "tests/unit/test_deploy.py",
        "regenerates the dashboard and compares it with the committed file",
    ),
    r"cp deploy/grafana/aha-dashboard\.json \S+/session_latest/metrics/grafana/dashboards/": (
        "tests/integration/test_submit.py",
        "checks that a real Ray session has that dashboards folder",
    ),
    r"ray metrics launch-prometheus": (
        "tests/integration/test_submit.py",
        "not run: it downloads Prometheus, which this machine cannot; the test scrapes the endpoint Prometheus "
        "would scrape",
    ),
    r"(helm|kubectl) .*": (
        "tests/unit/test_deploy.py",
        "not run: no Kubernetes here; the manifests are validated against the KubeRay and Kubernetes schemas",
    ),
    r"ray (up|down|dashboard) deploy/cluster/\S+\.yaml": (
        "tests/unit/test_deploy.py",
        "not run: needs a cloud account; the YAML is validated with Ray's own cluster schema",
    ),
    r"python -m bench\.smollm2_arms( --[\w-]+( [^-\s]\S*)+)*( \S+=\S+)*": (
        "tests/integration/test_smollm2_arms.py",
        "runs every kind of arm with a budget of a few steps each, exports, summarizes and resumes (slow, in "
        "CI); a full budget takes 30 minutes per run",
    ),
    r"docker build .*": (
        "tests/unit/test_deploy.py",
        "not run: no Docker here; the Dockerfile's versions are checked against pyproject.toml",
    ),
}
SETUP = re.compile(r"(\.|source) \S*activate")  # environment set-up lines: this test's PATH has the venv
COMMAND_WORDS = ("aha", "bash", "python", "ray", "kubectl", "helm", "docker", "cp", "pip")


@dataclass
class Command:
    page: str
    line: int
    text: str  # the command, comments stripped, continuation lines joined
    exit_code: int
    prints: list[str]  # lines of the ```text block right after its bash block

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _blocks(text: str):
    """(language, first line number, lines) of every fenced block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        yield m.group(1), start + 1, body
        i += 1


def commands(page: Path) -> list[Command]:
    out: list[Command] = []
    blocks = list(_blocks(page.read_text()))
    for n, (lang, first, body) in enumerate(blocks):
        if lang not in ("bash", "sh", "shell", ""):
            continue
        follow = blocks[n + 1] if n + 1 < len(blocks) else None
        prints = [ln.strip() for ln in follow[2] if ln.strip()] if follow and follow[0] == "text" else []
        pending, start = "", first
        for offset, raw in enumerate(body):
            line = raw.strip()
            if not pending:
                start = first + offset
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line, pending = pending + line, ""
            words = shlex.split(line, comments=True)
            if (
                not words
                or (lang == "" and words[0] not in COMMAND_WORDS)
                or SETUP.fullmatch(" ".join(words))
            ):
                continue
            m = re.search(r"#.*\bexits (\d+)", line)
            cmd = " ".join(shlex.quote(w) if w != ">" else w for w in words)
            out.append(Command(page.name, start, cmd, int(m.group(1)) if m else 0, prints))
    return out


ALL = [c for page in PAGES for c in commands(page)]


def _match(patterns, text: str) -> str | None:
    return next((p for p in patterns if re.fullmatch(p, text)), None)


def test_docs_have_commands_and_every_one_is_run_or_covered():
    assert len(ALL) > 20
    orphans = [f"{c.id}: {c.text}" for c in ALL if not _match([*RUN, *SLOW_RUN, *COVERED], c.text)]
    assert not orphans, "commands neither run by test_docs.py nor listed in COVERED:\n" + "\n".join(orphans)
    for pattern, (path, why) in COVERED.items():
        assert (ROOT / path).exists(), f"COVERED[{pattern!r}] names {path}, which does not exist"
        assert why


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory):
    """models/ as the README's demo leaves it (`aha make-tiny-model models/tiny-addition`): `aha validate`
    checks that the model folder a config names exists."""
    from aha.cluster.models import make_tiny_model

    models = tmp_path_factory.mktemp("demo") / "models"
    make_tiny_model(models / "tiny-addition", seed=0)
    return models


@pytest.fixture
def scratch(tmp_path, demo_models):
    """A folder where documented commands may write; deploy/ is the repository's, models/ the demo's."""
    (tmp_path / "deploy").symlink_to(ROOT / "deploy")
    (tmp_path / "models").symlink_to(demo_models)
    return tmp_path


def _run(cmd: Command, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        shlex.split(cmd.text), cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == cmd.exit_code, (
        f"{cmd.id}: `{cmd.text}` exited {done.returncode}\n{output[-3000:]}"
    )
    for expected in cmd.prints:
        assert expected in output, f"{cmd.id}: `{cmd.text}` did not print {expected!r}\n{output[-3000:]}"


@pytest.mark.parametrize("cmd", [c for c in ALL if _match(RUN, c.text)], ids=lambda c: c.id)
def test_documented_command_runs(cmd, scratch):
    _run(cmd, scratch)


@pytest.mark.slow
@pytest.mark.parametrize("cmd", [c for c in ALL if _match(SLOW_RUN, c.text)], ids=lambda c: c.id)
def test_documented_slow_command_runs(cmd, scratch):
    _run(cmd, scratch)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", lambda m: "_" if m.group(0) == "_" else "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_point_at_existing_pages_and_headings(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to missing {target}"
        if anchor and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: no heading #{anchor} in {dest.name}"


def test_the_docs_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text()
    missing = [
        p.name
        for p in PAGES
        if p.parent.name == "docs" and p.name != "README.md" and f"({p.name})" not in index
    ]
    assert not missing, f"docs/README.md does not link {missing}"
