"""`aha submit` against a real Ray cluster: a head started with `ray start --head` on explicit ports, a private
temp dir and token authentication; the tiny CPU job goes through Ray Jobs, reaches SUCCEEDED, writes its run
outputs, and its metrics reach the node's Prometheus endpoint under the names the Grafana dashboard queries. A job
whose driver is killed once is submitted again by `--retries` with `--resume auto`, and continues its run.

Only this test's own cluster is stopped afterwards: every process in the session of its `ray start`, plus any
process whose command line names its temp dir, and their descendants (never `ray stop`, which stops every Ray
on the machine)."""

from __future__ import annotations

import json
import os
import random
import re
import runpy
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # minutes: a real Ray head, jobs, killed drivers

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: aha, ray
DEMO = ROOT / "deploy" / "examples" / "cpu_demo.yaml"
DASHBOARD_JSON = ROOT / "deploy" / "grafana" / "aha-dashboard.json"
TINY = [
    "imitation.steps=2",
    "schedule.steps=2",
    "schedule.prompts_per_step=8",
    "schedule.eval_prompts=8",
    "rollout.num_engines=1",
    "reward.num_workers=1",
    "learner.num_ranks=1",
    "logging.progress=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_range(size: int = 100) -> tuple[int, int]:
    """A block of free ports below the kernel's ephemeral range, for Ray's worker processes."""
    for _ in range(50):
        low = random.randrange(20_000, 30_000 - size)
        if all(_port_is_free(p) for p in range(low, low + size)):
            return low, low + size - 1
    raise RuntimeError("no free block of worker ports")


class RayHead:
    """A Ray head of our own, and a way to stop exactly it."""

    def __init__(self, work: Path):
        self.temp_dir = tempfile.mkdtemp(prefix="aha-ray-")  # short: Ray's socket paths must stay < 108 chars
        self.token = secrets.token_hex(32)
        self.dashboard_port, self.metrics_port = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        low, high = _free_range()
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's entrypoint `aha` is found here
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
        }
        cmd = [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={_free_port()}",
            f"--dashboard-port={self.dashboard_port}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={self.metrics_port}",
            f"--ray-client-server-port={_free_port()}",
            f"--node-manager-port={_free_port()}",
            f"--object-manager-port={_free_port()}",
            f"--min-worker-port={low}",
            f"--max-worker-port={high}",
            "--num-cpus=8",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        self.log = (work / "ray-start.log").open("w")
        # Its own session: every daemon it starts inherits the session id, which is how teardown finds them.
        self.starter = subprocess.Popen(
            cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.sid = self.starter.pid

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        request = urllib.request.Request(
            f"{self.address}/api/version", headers={"Authorization": f"Bearer {self.token}"}
        )
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(request, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"Ray dashboard at {self.address} did not answer within {timeout_s:.0f} s")

    def processes(self) -> set[psutil.Process]:
        found = set()
        for p in psutil.process_iter(["cmdline"]):
            try:
                mine = os.getsid(p.pid) == self.sid or any(
                    self.temp_dir in arg for arg in p.info["cmdline"] or []
                )
                if mine:
                    found.add(p)
                    found.update(p.children(recursive=True))
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        return {p for p in found if p.pid != os.getpid()}

    def stop(self) -> list[int]:
        """Terminate this cluster's processes, then kill what is left; returns the pids still alive."""
        for _ in range(3):
            procs = self.processes()
            if not procs:
                break
            for p in procs:
                try:
                    p.send_signal(signal.SIGTERM)
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(list(procs), timeout=15)
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=10)
        self.log.close()
        left = sorted(p.pid for p in self.processes())
        if not left:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


@pytest.fixture
def ray_head(tmp_path):
    head = RayHead(tmp_path)
    try:
        head.wait_ready()
        yield head
    finally:
        left = head.stop()
        assert not left, f"processes of the test cluster still alive: {left}"


def _aha(
    *args: str, env: dict[str, str], timeout: float = 60, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "aha"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


class JobMetrics(threading.Thread):
    """Scrapes the node's Prometheus endpoint every 2 s while a job runs, as Prometheus would, and keeps every
    `ray_aha_*` series of the job it saw (Ray forgets a finished driver's gauges ~20 s after its last report)."""

    def __init__(self, port: int, job: str):
        super().__init__(daemon=True)
        self.port, self.job = port, job
        self.seen: set[str] = set()
        self.lines: list[str] = []  # the job's series, as scraped
        self.latest: dict[str, float] = {}  # each series' value in the newest scrape that had it
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                text = _scrape(self.port)
            except OSError:
                text = ""
            mine = re.findall(rf'^ray_aha_\w+\{{[^}}]*="{self.job}".*$', text, re.M)
            self.seen |= {line.split("{", 1)[0] for line in mine}
            self.lines += mine
            self.latest |= {line.split("{", 1)[0]: float(line.rsplit("}", 1)[1].split()[0]) for line in mine}
            self.done.wait(2)

    def stop(self) -> set[str]:
        self.done.set()
        self.join(30)
        return self.seen


def _dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD_JSON.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    return {m for e in exprs for m in re.findall(r"\bray_aha_\w+", e)}


def test_submit_tiny_job_to_a_real_cluster(ray_head, tmp_path):
    from aha.cluster.models import make_tiny_model

    # The README's example, from a checkout as the README leaves it: the repository's .gitignore (which lists
    # `models/`), the example config at its path, and `models/tiny-addition` made by `aha make-tiny-model`.
    # Ray's upload skips gitignored files; aha uploads the model the job needs anyway (and only it).
    # `aha` itself is installed on the cluster.
    work = tmp_path / "checkout"
    (work / "deploy" / "examples").mkdir(parents=True)
    shutil.copy(ROOT / ".gitignore", work / ".gitignore")
    shutil.copy(DEMO, work / "deploy" / "examples" / "cpu_demo.yaml")
    make_tiny_model(work / "models" / "tiny-addition", seed=0)
    run_dir = tmp_path / "outputs"
    overrides = [*TINY, f"logging.run_dir={run_dir}"]

    client_env = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_MODE"}  # aha finds the token itself
    client_env.pop("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None)
    scraper = JobMetrics(ray_head.metrics_port, "cpu-demo")
    scraper.start()
    started = time.monotonic()
    done = _aha(
        "submit",
        "deploy/examples/cpu_demo.yaml",
        *overrides,
        "--address",
        ray_head.address,
        "--wait",
        env=client_env,
        timeout=300,
        cwd=work,
    )
    elapsed = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, f"{out[-4000:]}\n{done.stderr[-4000:]}"
    job_id = re.search(r"^submitted (\S+)", out, re.M).group(1)
    assert job_id.startswith("cpu-demo-")
    assert "cluster.address=auto" in out  # joins the cluster it runs on, never a local Ray
    assert "models/tiny-addition is gitignored" in done.stderr  # said, and uploaded anyway
    assert f"{job_id}: SUCCEEDED" in out
    assert '"steps": 2' in out  # the job's own summary, streamed back by --wait
    print(f"submit --wait took {elapsed:.0f} s")

    # The run's outputs, where logging.run_dir put them.
    for name in ("metrics.jsonl", "summary.json", "report.png", "config.yaml", "final_model/config.json"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["imitation_steps"], summary["failed_prompts"]) == (2, 2, 0)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["cluster"]["address"] == "auto"

    # The other verbs, and Ray's own CLI as the docs show it (it needs RAY_AUTH_MODE=token to send the token).
    status = _aha("status", job_id, "--address", ray_head.address, env=client_env)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout, status.stderr
    logs = _aha("logs", job_id, "--address", ray_head.address, env=client_env)
    assert '"final_model"' in logs.stdout, logs.stderr[-2000:]
    stop = _aha("stop", job_id, "--address", ray_head.address, env=client_env)
    assert stop.returncode == 0 and "already finished" in stop.stdout, stop.stderr
    ray_logs = subprocess.run(
        [str(BIN / "ray"), "job", "logs", "--follow", job_id, "--address", ray_head.address],
        env=ray_head.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert '"final_model"' in ray_logs.stdout, ray_logs.stderr[-2000:]
    # The folder docs/cluster.md copies the Grafana dashboard into exists in a real session.
    assert (Path(ray_head.temp_dir) / "session_latest/metrics/grafana/dashboards").is_dir()

    # Metrics: every key of metrics.jsonl is exported as a Prometheus gauge `ray_aha_<key>` with the job's name
    # as a tag, and every metric the Grafana dashboard queries is among them. The final evaluation's values too.
    # (Here the export after that evaluation outlasts Ray's 10 s report interval, so they would go out even
    # without the driver's wait at exit, MetricsLogger._flush_ray_metrics, whose rule test_metrics_flush.py
    # checks: it matters for a run whose last values come within an interval of its exit.)
    exported = scraper.stop()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    keys = {k for r in records for k in r if k not in ("step", "time_s")}
    expected = {"ray_aha_" + re.sub(r"[^a-zA-Z0-9_]", "_", k) for k in keys}
    assert expected <= exported, f"not exported: {sorted(expected - exported)}"
    # the values of the run's last record (its final evaluation) are the last ones Prometheus saw
    last = {"ray_aha_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in records[-1].items()}
    last = {k: v for k, v in last.items() if k in expected}
    stale = {
        k: (v, scraper.latest.get(k)) for k, v in last.items() if scraper.latest.get(k) != pytest.approx(v)
    }
    assert last and not stale, f"final values not exported (metrics.jsonl, scraped): {stale}"
    assert _dashboard_metrics() <= exported, (
        f"dashboard queries unknown metrics: {_dashboard_metrics() - exported}"
    )
    # The dashboard filters jobs on the label Prometheus will store the job's tag under: a target label that
    # clashes with Prometheus' own `job` or `instance` is renamed `exported_<name>` (Ray's scrape config).
    (tag,) = {re.search(r'\b(\w+)="cpu-demo"', line).group(1) for line in scraper.lines}
    stored = f"exported_{tag}" if tag in ("job", "instance") else tag
    assert runpy.run_path(str(DASHBOARD_JSON.with_name("dashboard.py")))["JOB_LABEL"] == stored

    # docs/operations.md documents every metric the run wrote (names with <...> stand for a family).
    documented = (ROOT / "docs" / "operations.md").read_text()
    undocumented = sorted(
        k for k in keys if f"`{k}`" not in documented and not _family_documented(k, documented)
    )
    assert not undocumented, f"metrics missing from docs/operations.md: {undocumented}"


def _family_documented(key: str, text: str) -> bool:
    """`monitor/phrase/wait` is covered by a documented `monitor/phrase/<phrase>`."""
    head = key.rsplit("/", 1)[0]
    return re.search(rf"`{re.escape(head)}/<\w+>`", text) is not None


KILL_ONCE = '''
import json
import os
import signal
from pathlib import Path


def reward(prompt, completion, *, answer, run_dir, marker, **_):
    """Exact match. The first call after the run's first checkpoint kills the job's driver (SIGKILL), once."""
    if Path(run_dir, "checkpoints", "latest_run").is_file() and not Path(marker).exists():
        Path(marker).write_text("killed")
        os.kill(json.loads(Path(run_dir, ".aha-driver.json").read_text())["pid"], signal.SIGKILL)
    return float(completion.strip() == str(answer))
'''


def test_submit_retries_a_failed_job_which_resumes_its_run(ray_head, tmp_path):
    from aha.cluster.models import make_tiny_model

    work = tmp_path / "checkout"
    (work / "deploy" / "examples").mkdir(parents=True)
    shutil.copy(DEMO, work / "deploy" / "examples" / "cpu_demo.yaml")
    make_tiny_model(work / "models" / "tiny-addition", seed=0)
    (work / "kill_once.py").write_text(KILL_ONCE)
    run_dir, marker = tmp_path / "outputs", tmp_path / "killed"
    kwargs = f"{{run_dir: '{run_dir}', marker: '{marker}'}}"
    overrides = [
        *TINY,
        "schedule.steps=4",
        "checkpoint.every=2",
        f"logging.run_dir={run_dir}",
        f"reward.functions=[{{function: 'kill_once.py:reward', kwargs: {kwargs}}}]",
    ]
    client_env = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_MODE"}
    done = _aha(
        "submit",
        "deploy/examples/cpu_demo.yaml",
        *overrides,
        "--address",
        ray_head.address,
        "--retries",
        "2",
        env=client_env,
        timeout=600,
        cwd=work,
    )
    out = done.stdout
    assert done.returncode == 0, f"{out[-4000:]}\n{done.stderr[-4000:]}"
    assert marker.read_text() == "killed"  # the first attempt's driver was killed
    first, second = re.findall(r"^submitted (\S+)", out, re.M)
    assert re.search(rf"^{first}: FAILED \(attempt 1 of 3\), exit code -?\d+$", out, re.M), out[-4000:]
    assert f"{second}: SUCCEEDED (attempt 2 of 3)" in out
    entrypoints = re.findall(r"^  entrypoint: (.*)$", out, re.M)
    assert not entrypoints[0].endswith("--resume auto") and entrypoints[1].endswith("--resume auto")
    assert "aha: resumed from step-" in out  # the retry's log: it continued the run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["imitation_steps"]) == (4, 2)
