"""Ray Jobs: `aha submit` ships a folder to a Ray cluster and runs `aha run CONFIG` there; status, logs, stop.

The folder (`--working-dir`, default `.`) is zipped, uploaded through the dashboard and unpacked on every node
the job uses; the job's driver and all its actors start inside it. So the config and every relative path in it
(model.path, data files, reward files) must lie inside that folder. Large models belong on storage that every
node can read, named by an absolute path. `job_request` checks all of this before anything is uploaded.

Ray's upload leaves out what `runtime_env.excludes`, `.rayignore` and `.gitignore` files name. What the job
reads is checked against Ray's own walk of the folder (`uploaded_files`): a file the job needs that only a
`.gitignore` leaves out (the README's `models/tiny-addition`: `models/` is gitignored) is uploaded anyway: the
upload then ignores `.gitignore` files and excludes every other gitignored path explicitly, so exactly the needed
files are added. A needed file left out by `excludes` or `.rayignore` is refused (exit 2, naming it).
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aha.cluster.config import JobConfig, JsonlData
from aha.cluster.config_file import ConfigError, load_config
from aha.cluster.hub import hub_id, hub_problem
from aha.cluster.preflight import file_problem, model_problem

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
IGNORE_GITIGNORE = "RAY_RUNTIME_ENV_IGNORE_GITIGNORE"
DEFAULT_EXCLUDES = [".venv", ".cache", "runs", ".git", "__pycache__", "*.pyc"]
"""Left out of the upload unless `cluster.runtime_env.excludes` says otherwise."""


@dataclass
class JobRequest:
    """Everything `submit_job` is called with, plus notes for the user."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)
    ignore_gitignore: bool = False
    """Upload with RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 (gitignored paths the job does not need are in excludes)."""


def _relative_paths(cfg: JobConfig) -> list[tuple[str, str]]:
    """(config key, path) of every relative file path the job will open."""
    paths = [("model.path", cfg.model.path)]
    if isinstance(cfg.data, JsonlData):
        paths.append(("data.path", cfg.data.path))
        if cfg.data.eval_path:
            paths.append(("data.eval_path", cfg.data.eval_path))
    if cfg.imitation.path:
        paths.append(("imitation.path", cfg.imitation.path))
    for i, fn in enumerate(cfg.reward.functions):
        module = fn.function.rsplit(":", 1)[0]
        if module.endswith(".py"):
            paths.append((f"reward.functions.{i}.function", module))
    return [(key, p) for key, p in paths if not Path(p).is_absolute()]


def _excluded(path: str, patterns: list[str]) -> str | None:
    """The exclude pattern that keeps `path` out of the upload (matched per path component), if any."""
    for part in Path(path).parts:
        for pattern in patterns:
            if fnmatch.fnmatch(part, pattern.strip("/")):
                return pattern
    return None


def job_request(
    config: str, overrides: list[str], working_dir: str = ".", resume: bool | Literal["auto"] = False
) -> JobRequest:
    """Validate the config and build the Ray Jobs request: raises ConfigError naming what would break remotely.
    `resume` runs `aha run --resume` (continue from the checkpoint in logging.run_dir); "auto": `--resume auto`
    (continue this job's checkpoint, or start it: cluster/restarts.py)."""
    cfg = load_config(config, overrides)
    root = Path(working_dir).resolve()
    if not root.is_dir():
        raise ConfigError(f"--working-dir {working_dir}: not a folder")
    try:
        config_rel = Path(config).resolve().relative_to(root)
    except ValueError:
        raise ConfigError(
            f"{config} is outside the working dir {root}: the job only sees files uploaded with it "
            "(pass --working-dir with a folder that contains the config)"
        ) from None
    if "working_dir" in cfg.cluster.runtime_env:
        raise ConfigError("cluster.runtime_env.working_dir: set the folder with `aha submit --working-dir`")
    runtime_env = {"working_dir": str(root), **cfg.cluster.runtime_env}
    runtime_env.setdefault("excludes", list(DEFAULT_EXCLUDES))

    problems, needed = [], {"the config": str(config_rel)}
    for key, path in _relative_paths(cfg):
        pattern = _excluded(path, runtime_env["excludes"])
        local = root / path
        if pattern is not None:
            problems.append(f"{key}: {path} is excluded from the upload by {pattern!r}")
        elif not local.exists() and key == "model.path" and (ref := hub_id(path)) is not None:
            if problem := hub_problem(*ref):  # else a Hub id, resolved by the job's driver on the cluster
                problems.append(
                    f"{key}: {path} does not exist in {root}, and as a Hugging Face Hub id: {problem}"
                )
        elif not local.exists():
            problems.append(f"{key}: {path} does not exist in {root}")
        elif problem := (model_problem if key == "model.path" else file_problem)(str(local)):
            problems.append(f"{key}: {path} {problem}")
        elif not local.resolve().is_relative_to(root):
            problems.append(f"{key}: {path} is outside the working dir {root}")
        else:
            needed[key] = str(local.resolve().relative_to(root))
    if problems:
        raise ConfigError(
            "relative paths are read inside the uploaded working dir, and these would be missing there:\n  "
            + "\n  ".join(problems)
            + "\n(move them into the working dir, or use absolute paths that exist on every node)"
        )
    extra_excludes, notes = upload_plan(root, needed, runtime_env["excludes"])
    if extra_excludes is not None:
        runtime_env["excludes"] = [*runtime_env["excludes"], *extra_excludes]

    if not Path(cfg.logging.run_dir).is_absolute():
        notes.append(
            f"logging.run_dir {cfg.logging.run_dir!r} is relative: the outputs land in the job's unpacked copy of "
            "the working dir (inside Ray's temp dir on the node that runs the driver) and go away with the "
            "cluster. Use an absolute path on lasting storage, shared by all nodes if learner ranks span nodes."
        )
    # `cluster.address=auto`: join the cluster the job runs on (Ray Jobs sets RAY_ADDRESS), never a local Ray,
    # and never pass cluster.num_cpus, which Ray refuses when connecting to an existing cluster.
    argv = ["aha", "run", str(config_rel), *overrides, "cluster.address=auto"]
    resume_args = {False: [], True: ["--resume"], "auto": ["--resume", "auto"]}[resume]
    entrypoint = shlex.join([*argv, *resume_args])
    return JobRequest(
        submission_id=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}",
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        metadata={"aha_job": cfg.name, "aha_config": str(config_rel)},
        notes=notes,
        ignore_gitignore=extra_excludes is not None,
    )


# ---------------------------------------------------------------------------------------------------------------
# what Ray's working-dir upload takes


def uploaded_files(root: Path, excludes: list[str], gitignore: bool = True) -> set[str]:
    """Paths (relative to `root`) of the files Ray's working-dir upload takes, by Ray's own walk: `excludes`,
    `.rayignore` files and, with `gitignore`, `.gitignore` files (each applying from its own folder down)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    found: set[str] = set()

    def take(path: Path) -> None:
        if path.is_file():
            found.add(str(path.relative_to(root)))

    _dir_travel(root, [_get_excludes(root, excludes)], take, include_gitignore=gitignore)
    return found


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _anchored(rel: str) -> str:
    """A gitwildmatch pattern matching exactly this path below the working dir (wildcards escaped)."""
    escaped = "".join(f"[{c}]" if c in "*?[]\\" else c for c in rel)
    return "/" + escaped


def upload_plan(
    root: Path, needed: dict[str, str], excludes: list[str]
) -> tuple[list[str] | None, list[str]]:
    """(extra excludes, notes). None: Ray's usual upload already takes every needed file. A list: upload with
    `.gitignore` files ignored plus these excludes, which leave out every gitignored path except the needed
    ones. ConfigError when a needed file would be missing either way (`excludes`, `.rayignore`)."""
    everything = uploaded_files(root, excludes, gitignore=False)
    honoured = os.environ.get(IGNORE_GITIGNORE, "0") != "1"  # Ray's client reads the same variable
    with_gitignore = uploaded_files(root, excludes, gitignore=True) if honoured else everything
    missing, refused = {}, []
    for key, rel in needed.items():
        files = sorted(f for f in everything if _under(f, rel))
        if not files:
            refused.append(
                f"{key}: {rel} is left out of the upload by a .rayignore file or runtime_env.excludes"
            )
            continue
        skipped = [f for f in files if f not in with_gitignore]
        if skipped:
            missing[key] = (rel, skipped)
    if refused:
        raise ConfigError(
            "the job needs files that Ray's upload of the working dir would leave out:\n  "
            + "\n  ".join(refused)
            + "\n(remove them from .rayignore / cluster.runtime_env.excludes, or use absolute paths that exist "
            "on every node)"
        )
    if not missing:
        return None, []
    keep = {f for rel, files in missing.values() for f in files}
    dropped = everything - with_gitignore - keep
    extra = _cover(dropped, everything)
    # The plan must be what Ray will do: walk again with it.
    planned = uploaded_files(root, [*excludes, *extra], gitignore=False)
    if planned != with_gitignore | keep:
        raise ConfigError(
            "the job needs gitignored files ("
            + ", ".join(rel for rel, _ in missing.values())
            + ") and aha could not express the rest of .gitignore as upload excludes: use absolute paths that "
            "exist on every node"
        )
    notes = [
        f"{key}: {rel} is gitignored, which Ray's upload would skip; it is uploaded anyway "
        f"({len(files)} file(s)), and the other gitignored files stay out"
        for key, (rel, files) in missing.items()
    ]
    return extra, notes


def _cover(dropped: set[str], everything: set[str]) -> list[str]:
    """The fewest anchored patterns that match exactly the `dropped` files among `everything`: a folder whose
    files are all dropped is one pattern."""
    total: dict[str, int] = {}
    gone: dict[str, int] = {}
    for f in everything:
        parts = f.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            total[folder] = total.get(folder, 0) + 1
            if f in dropped:
                gone[folder] = gone.get(folder, 0) + 1
    patterns = set()
    for f in dropped:
        parts = f.split("/")
        top = next(
            (
                "/".join(parts[:i])
                for i in range(1, len(parts))
                if gone.get("/".join(parts[:i])) == total["/".join(parts[:i])]
            ),
            f,
        )
        patterns.add(_anchored(top))
    return sorted(patterns)


# ---------------------------------------------------------------------------------------------------------------
# talking to the cluster


def auth_token() -> str | None:
    """The Ray auth token of this machine, unless RAY_AUTH_MODE=disabled.

    With Ray 2.60 (the pinned version), `ray start --head` on a machine that has a token turns on token
    authentication for the dashboard, and `ray.init()` creates one in ~/.ray/auth_token. Ray's own clients
    send it only when RAY_AUTH_MODE=token is set; aha sends it whenever one exists: RAY_AUTH_TOKEN, else the
    file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. A cluster without authentication ignores it.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return (path.read_text().strip() or None) if path.is_file() else None


def _client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except ConnectionError as e:
        raise ConfigError(f"cannot reach the Ray dashboard at {address}: {e}") from None
    except AuthenticationError:
        raise ConfigError(
            f"the Ray cluster at {address} refused this machine's auth token (or found none): put the "
            "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
        ) from None


def submit(
    config: str,
    overrides: list[str],
    address: str,
    working_dir: str = ".",
    wait: bool = False,
    resume: bool | Literal["auto"] = False,
    retries: int = 0,
) -> int:
    """`aha submit`: upload the working dir and start `aha run`; with `wait`, stream the logs until the job ends
    and return 0 only if it SUCCEEDED. With `retries` (which waits): a job that FAILED is submitted again with
    `--resume auto`, up to `retries` times (`retry_after` says when)."""
    for attempt in range(retries + 1):
        req = job_request(config, overrides, working_dir, resume=resume if attempt == 0 else "auto")
        for note in req.notes if attempt == 0 else []:
            print(f"aha: note: {note}", file=sys.stderr)
        job_id = _submit(req, address)
        if not (wait or retries):
            return 0
        status, exit_code = _wait(job_id, address)
        tries = f" (attempt {attempt + 1} of {retries + 1})" if retries else ""
        print(f"{job_id}: {status}{tries}" + (f", exit code {exit_code}" if status == "FAILED" else ""))
        if attempt == retries or not retry_after(status, exit_code):
            break
        print(f"aha: submitting {req.metadata['aha_job']} again with --resume auto", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def retry_after(status: str, exit_code: int | None) -> bool:
    """Whether `aha submit --retries` submits a job again after it ended with `status`: only after FAILED, and
    not when `aha run` refused the job (exit 2: its config or run dir, which a retry would refuse again). A job
    someone stopped stays stopped."""
    return status == "FAILED" and exit_code != 2


def _submit(req: JobRequest, address: str) -> str:
    """Upload the working dir and submit `req`; prints how to follow the job. Returns its id."""
    client = _client(address)
    saved = os.environ.get(IGNORE_GITIGNORE)
    if req.ignore_gitignore:  # read by Ray's client when it packs the working dir
        os.environ[IGNORE_GITIGNORE] = "1"
    try:
        job_id = client.submit_job(
            entrypoint=req.entrypoint,
            submission_id=req.submission_id,
            runtime_env=req.runtime_env,
            metadata=req.metadata,
        )
    finally:
        if saved is None:
            os.environ.pop(IGNORE_GITIGNORE, None)
        else:
            os.environ[IGNORE_GITIGNORE] = saved
    base = address.rstrip("/")
    print(f"submitted {job_id}")
    print(f"  entrypoint: {req.entrypoint}")
    print(f"  dashboard:  {base}/#/jobs/{job_id}")
    print(f"  status:     aha status {job_id} --address {address}")
    print(f"  logs:       aha logs {job_id} --address {address}")
    print(f"  stop:       aha stop {job_id} --address {address}")
    return job_id


def _wait(job_id: str, address: str) -> tuple[str, int | None]:
    """Stream the job's logs until it ends; its final status and its driver's exit code (None if unknown)."""
    try:
        _follow(_client(address), job_id)
        status = wait_for(job_id, address)
    except KeyboardInterrupt:
        print(f"\naha: stopped waiting; {job_id} keeps running (aha stop {job_id} --address {address})")
        raise
    return status, getattr(_client(address).get_job_info(job_id), "driver_exit_code", None)


def _follow(client, job_id: str) -> None:
    """Print the job's logs as they come, from the start, until the job ends or the stream breaks."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the stream closed before the job ended: fall back to polling the status
        print(f"aha: log stream of {job_id} closed early ({e}); waiting for the job", file=sys.stderr)


def wait_for(job_id: str, address: str, timeout_s: float = 7 * 24 * 3600, poll_s: float = 2.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns that status."""
    client = _client(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} did not finish within {timeout_s:.0f} s")


def job_status(job_id: str, address: str) -> int:
    info = _client(address).get_job_info(job_id)
    print(f"{job_id}: {info.status.value}" + (f"  ({info.message})" if info.message else ""))
    return 0


def job_logs(job_id: str, address: str, follow: bool = False) -> int:
    client = _client(address)
    if follow:
        _follow(client, job_id)
    else:
        print(client.get_job_logs(job_id), end="")
    return 0


def job_stop(job_id: str, address: str) -> int:
    stopped = _client(address).stop_job(job_id)
    print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0
