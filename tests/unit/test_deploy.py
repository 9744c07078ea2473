"""deploy/: every YAML parses; the cluster-launcher YAML passes Ray's own schema; the KubeRay manifests pass a
schema of the KubeRay v1 fields and their pod templates pass the Kubernetes schema (kubernetes-validate, strict);
the GPU job fits the pods and nodes that are meant to run it; the Dockerfile agrees with pyproject.toml; the
Grafana dashboard is current. Also the pure part of `aha submit` (cluster/jobs.py): what it would send, and what
it refuses before uploading anything."""

from __future__ import annotations

import json
import re
import runpy
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from aha.cluster.config import JobConfig
from aha.cluster.config_file import ConfigError, load_config
from aha.cluster.jobs import DEFAULT_EXCLUDES, auth_token, job_request

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
GPU_EXAMPLE = DEPLOY / "examples" / "gpu_zero3.yaml"
KUBE_VERSION = "1.30"
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def _pin(name: str, extra: str | None = None) -> str:
    """The exact version pyproject.toml pins for `name`: in the dependencies, or in the list of `extra`."""
    text = PYPROJECT
    if extra is not None:
        text = re.search(rf"^{extra} = \[(.*?)\]$", PYPROJECT, re.M | re.S).group(1)
    m = re.search(rf'"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)"', text)
    assert m, f"{name} is not pinned in pyproject.toml"
    return m.group(2)


RAY_VERSION = _pin("ray")
GPU_TORCH = _pin("torch", extra="gpu")


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_in_deploy_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


# ---------------------------------------------------------------------------------------------------------------
# the GPU job and what it asks of a cluster


def job_demand(cfg: JobConfig) -> dict[str, float]:
    """Logical CPUs and GPUs the job's actors ask Ray for (docs/scaling.md shows the same sums)."""
    r, w, lr = cfg.rollout, cfg.reward, cfg.learner
    return {
        "CPU": r.num_engines * r.cpus_per_engine
        + w.num_workers * w.cpus_per_worker
        + lr.num_ranks * lr.cpus_per_rank,
        "GPU": r.num_engines * r.gpus_per_engine + lr.num_ranks * lr.gpus_per_rank,
    }


def test_gpu_example_is_a_scaled_zero3_gpu_job():
    cfg = load_config(GPU_EXAMPLE).resolved()
    assert cfg.device == "cuda" and cfg.learner.zero_stage == 3
    assert (cfg.learner.backend, cfg.learner.dtype, cfg.weight_sync.transport) == (
        "nccl",
        "bfloat16",
        "torch_dist",
    )
    assert cfg.rollout.num_engines > 1 and cfg.learner.num_ranks > 1 and cfg.reward.num_workers > 1
    assert cfg.rollout.gpus_per_engine == cfg.rollout.tensor_parallel_size
    assert Path(cfg.model.path).is_absolute() and Path(cfg.logging.run_dir).is_absolute()
    assert job_demand(cfg) == {"CPU": 24, "GPU": 8}  # as its header comment says


# ---------------------------------------------------------------------------------------------------------------
# Ray cluster launcher


def test_cluster_launcher_yaml_passes_rays_schema_and_fits_the_gpu_job():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((DEPLOY / "cluster" / "aws-gpu.yaml").read_text())
    config = prepare_config(raw)  # what `ray up` does first: merge the provider's defaults, then validate
    validate_config(config)
    assert raw["setup_commands"] == []  # nothing installed at start: the image has it all
    assert raw["docker"]["image"] == "ghcr.io/your-org/aha:gpu"
    gpus_per_instance = {"g5.12xlarge": 4}
    workers = [t for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]]
    gpus = sum(gpus_per_instance[t["node_config"]["InstanceType"]] * t["min_workers"] for t in workers)
    assert gpus >= job_demand(load_config(GPU_EXAMPLE))["GPU"]
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    assert all("--metrics-export-port=8080" in c for c in starts if "ray start" in c)
    assert any("/mnt/shared" in opt for opt in raw["docker"]["run_options"])  # logging.run_dir's file system


# ---------------------------------------------------------------------------------------------------------------
# KubeRay

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {"type": "object", "required": ["spec"]}  # checked separately against the Kubernetes schema
_HEAD_GROUP = {
    "type": "object",
    "required": ["template", "rayStartParams"],
    "additionalProperties": False,
    "properties": {
        "template": _POD_TEMPLATE,
        "rayStartParams": _STR_MAP,
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "serviceType": {"type": "string"},
    },
}
_WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "template", "rayStartParams", "minReplicas", "maxReplicas"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string"},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "idleTimeoutSeconds": {"type": "integer"},
        "rayStartParams": _STR_MAP,
        "template": _POD_TEMPLATE,
        "scaleStrategy": {"type": "object"},
        "numOfHosts": {"type": "integer", "minimum": 1},
        "suspend": {"type": "boolean"},
    },
}
_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "headGroupSpec": _HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "headServiceAnnotations": _STR_MAP,
        "gcsFaultToleranceOptions": {"type": "object"},
        "managedBy": {"type": "string"},
        "suspend": {"type": "boolean"},
    },
}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
KUBERAY_SCHEMAS = {
    # The spec fields of KubeRay's v1 API (ray-operator/apis/ray/v1/raycluster_types.go and rayjob_types.go).
    "RayCluster": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": "RayCluster"},
            "metadata": _METADATA,
            "spec": _CLUSTER_SPEC,
        },
    },
    "RayJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": "RayJob"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["entrypoint", "rayClusterSpec"],
                "additionalProperties": False,
                "properties": {
                    "entrypoint": {"type": "string"},
                    "runtimeEnvYAML": {"type": "string"},
                    "jobId": {"type": "string"},
                    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "rayClusterSpec": _CLUSTER_SPEC,
                    "submitterPodTemplate": _POD_TEMPLATE,
                    "submitterConfig": {"type": "object"},
                    "metadata": _STR_MAP,
                    "clusterSelector": _STR_MAP,
                    "entrypointNumCpus": {"type": "number"},
                    "entrypointNumGpus": {"type": "number"},
                    "entrypointResources": {"type": "string"},
                    "deletionPolicy": {
                        "enum": ["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"]
                    },
                    "managedBy": {"type": "string"},
                    "suspend": {"type": "boolean"},
                },
            },
        },
    },
}
MANIFESTS = sorted((DEPLOY / "kuberay").glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec.get("workerGroupSpecs", []))]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifests_pass_their_schemas(path):
    for doc in _docs(path):
        if doc["kind"] in KUBERAY_SCHEMAS:
            jsonschema.validate(doc, KUBERAY_SCHEMAS[doc["kind"]])
            spec = _cluster_spec(doc)
            assert spec["rayVersion"] == RAY_VERSION
            for template in _pod_templates(spec):
                pod = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": "t"},
                    "template": template,
                }
                kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
                images = {c["image"] for c in template["spec"]["containers"]}
                assert images == {"ghcr.io/your-org/aha:gpu"}
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda d: d["spec"].update(shutdownAfterJobFinish=True), jsonschema.ValidationError),
        (
            lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].pop("rayStartParams"),
            jsonschema.ValidationError,
        ),
        (
            lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][
                0
            ].update(imagePullPolcy="Always"),
            kubernetes_validate.ValidationError,
        ),
    ],
    ids=["typo-in-rayjob-spec", "missing-rayStartParams", "typo-in-container"],
)
def test_the_manifest_checks_catch_mistakes(mutate, error):
    job = next(d for d in _docs(DEPLOY / "kuberay" / "rayjob.yaml") if d["kind"] == "RayJob")
    mutate(job)
    with pytest.raises(error):
        jsonschema.validate(job, KUBERAY_SCHEMAS["RayJob"])
        for template in _pod_templates(job["spec"]["rayClusterSpec"]):
            pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)


def _quantity(value: str | int) -> float:
    value = str(value)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _fits(spec: dict, cfg: JobConfig) -> None:
    """The job's actors fit the worker pods (the head has num-cpus 0), and every pod mounts run_dir's volume."""
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    have = {"CPU": 0.0, "GPU": 0.0}
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        count = group.get("replicas", group["minReplicas"])
        have["CPU"] += count * _quantity(limits["cpu"])
        have["GPU"] += count * _quantity(limits.get("nvidia.com/gpu", 0))
    need = job_demand(cfg)
    assert need["CPU"] <= have["CPU"] and need["GPU"] <= have["GPU"], (need, have)
    run_dir = cfg.logging.run_dir
    for template in _pod_templates(spec):
        mounts = [m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]]
        assert any(run_dir.startswith(m.rstrip("/") + "/") for m in mounts), (run_dir, mounts)


def test_rayjob_runs_aha_on_the_mounted_config_and_fits_it():
    docs = {d["kind"]: d for d in _docs(DEPLOY / "kuberay" / "rayjob.yaml")}
    job, config_map = docs["RayJob"], docs["ConfigMap"]
    # The mounted job config is the GPU example, verbatim in content.
    ((key, text),) = config_map["data"].items()
    assert yaml.safe_load(text) == yaml.safe_load(GPU_EXAMPLE.read_text())
    cfg = JobConfig.model_validate(yaml.safe_load(text))
    # The entrypoint runs `aha run` on the file where the head pod mounts that ConfigMap.
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volume = next(
        v["name"]
        for v in head["volumes"]
        if v.get("configMap", {}).get("name") == config_map["metadata"]["name"]
    )
    mount = next(m["mountPath"] for m in head["containers"][0]["volumeMounts"] if m["name"] == volume)
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["aha", "run", f"{mount}/{key}"]
    assert "cluster.address=auto" in argv[3:]
    # A retry (backoffLimit) runs the same entrypoint: it continues the run, or finds it finished.
    assert argv[-2:] == ["--resume", "auto"] and job["spec"]["backoffLimit"] >= 1
    _fits(job["spec"]["rayClusterSpec"], cfg)


def test_raycluster_fits_the_gpu_example():
    (cluster,) = _docs(DEPLOY / "kuberay" / "raycluster.yaml")
    _fits(cluster["spec"], load_config(GPU_EXAMPLE))


# ---------------------------------------------------------------------------------------------------------------
# container image


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def test_dockerfile_builds_the_gpu_dependency_set_pinned_in_pyproject():
    steps = _dockerfile()
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    base = args["RAY_IMAGE"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py3\d+-gpu", base), base
    py = re.search(r"-py3(\d+)-", base).group(1)
    assert f"3.{py}" < "3.13" and f"3.{py}" >= "3.10"  # inside requires-python
    runs = " && ".join(a for i, a in steps if i == "RUN")
    assert f'"torch=={GPU_TORCH}"' in runs
    assert re.search(r'pip install [^&]*"\.\[gpu[,\]]', runs), runs
    copied = {a.split()[-1].strip("./") for i, a in steps if i == "COPY"}
    assert {"actors", "learner", "cluster"} <= copied
    # The model folder the GPU configs name is created in the image.
    model = load_config(GPU_EXAMPLE).model.path
    assert f"aha convert-smollm2 {model}" in runs
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "runs", "models"} <= set(ignored)


# ---------------------------------------------------------------------------------------------------------------
# Grafana


def test_grafana_dashboard_is_current_and_well_formed():
    generator = runpy.run_path(str(DEPLOY / "grafana" / "dashboard.py"))
    committed = json.loads((DEPLOY / "grafana" / "aha-dashboard.json").read_text())
    assert committed == generator["dashboard"](), (
        "regenerate: python deploy/grafana/dashboard.py > deploy/grafana/aha-dashboard.json"
    )
    ids = [p["id"] for p in committed["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in committed["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    label = generator["JOB_LABEL"]
    for panel in committed["panels"]:
        for target in panel.get("targets", []):
            assert re.fullmatch(rf'ray_aha_\w+\{{{label}=~"\$job"\}}', target["expr"]), target["expr"]


# ---------------------------------------------------------------------------------------------------------------
# `aha submit`, before anything is sent


@pytest.fixture
def job_dir(tmp_path):
    """A working dir as a user would submit it: the demo config and a (fake) model folder."""
    (tmp_path / "models" / "tiny-addition").mkdir(parents=True)
    (tmp_path / "models" / "tiny-addition" / "config.json").write_text("{}")
    (tmp_path / "job.yaml").write_text((DEPLOY / "examples" / "cpu_demo.yaml").read_text())
    return tmp_path


def test_submit_request_runs_aha_run_on_the_uploaded_config(job_dir):
    req = job_request(
        str(job_dir / "job.yaml"), ["schedule.steps=2", "logging.run_dir=/data/{name}"], str(job_dir)
    )
    assert shlex.split(req.entrypoint) == [
        "aha", "run", "job.yaml", "schedule.steps=2", "logging.run_dir=/data/{name}", "cluster.address=auto",
    ]  # fmt: skip
    assert req.runtime_env == {"working_dir": str(job_dir), "excludes": DEFAULT_EXCLUDES}
    assert req.metadata == {"aha_job": "cpu-demo", "aha_config": "job.yaml"}
    assert re.fullmatch(r"cpu-demo-\d{8}-\d{6}-[0-9a-f]{4}", req.submission_id)
    assert req.notes == []  # run_dir is absolute
    resumed = job_request(
        str(job_dir / "job.yaml"), ["logging.run_dir=/data/{name}"], str(job_dir), resume=True
    )
    assert shlex.split(resumed.entrypoint)[-2:] == ["cluster.address=auto", "--resume"]
    retried = job_request(
        str(job_dir / "job.yaml"), ["logging.run_dir=/data/{name}"], str(job_dir), resume="auto"
    )
    assert shlex.split(retried.entrypoint)[-3:] == ["cluster.address=auto", "--resume", "auto"]


def test_submit_request_keeps_the_users_runtime_env_and_warns_about_relative_run_dirs(job_dir):
    req = job_request(
        str(job_dir / "job.yaml"),
        ['cluster.runtime_env={"env_vars": {"A": "1"}, "excludes": ["big"]}'],
        str(job_dir),
    )
    assert req.runtime_env == {"working_dir": str(job_dir), "env_vars": {"A": "1"}, "excludes": ["big"]}
    assert len(req.notes) == 1 and "logging.run_dir" in req.notes[0]


@pytest.mark.parametrize(
    "overrides, working_dir, message",
    [
        ([], "elsewhere", "outside the working dir"),
        (["model.path=models/missing"], None, "model.path: models/missing does not exist"),
        (["model.path=runs/model"], None, "excluded from the upload by 'runs'"),
        (
            ["reward.functions=[{function: rewards/mine.py:score}]"],
            None,
            "reward.functions.0.function: rewards/mine.py does not exist",
        ),
        (["cluster.runtime_env={working_dir: /x}"], None, "cluster.runtime_env.working_dir"),
        (["learner.zero_stage=5"], None, "learner.zero_stage"),
    ],
)
def test_submit_refuses_what_would_break_on_the_cluster(
    job_dir, tmp_path_factory, overrides, working_dir, message
):
    (job_dir / "runs" / "model").mkdir(parents=True)
    wd = str(tmp_path_factory.mktemp(working_dir)) if working_dir else str(job_dir)
    with pytest.raises(ConfigError, match=re.escape(message)):
        job_request(str(job_dir / "job.yaml"), overrides, wd)


def test_auth_token_is_found_like_rays_own_clients(tmp_path, monkeypatch):
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_token() == "from-home"
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token() == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_token() is None
