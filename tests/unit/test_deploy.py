"""deploy/: container image, KubeRay manifests, cluster-launcher YAMLs, the cluster config.

Nothing here starts Ray, Docker or Kubernetes, or touches the network: the files are read
and checked against Ray's own cluster-config schema and validation, against the deployment
config they run, and against each other (sizes, names, versions, paths).
"""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from ppray.config import DeploymentConfig, load_config
from ppray.instrument import load_instrument

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CLUSTER_CONFIG = REPO / "configs" / "deployments" / "lsstcam-kafka-cluster.yaml"
LAUNCHERS = ("aws", "gcp", "onprem")
SECRET_ENV = "PPRAY_KAFKA__SASL_PASSWORD"
MIB = 1024**2


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / name).read_text()) if d]


def _one(name: str, kind: str) -> dict[str, Any]:
    found = [d for d in _docs(name) if d.get("kind") == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("14", "500m", "54Gi", "2G") as a number (cores or bytes)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    units |= {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    assert match, f"not a quantity: {text!r}"
    number, unit = match.groups()
    return float(number) * (units[unit] if unit else 1.0)


def _cluster_config() -> DeploymentConfig:
    return load_config(CLUSTER_CONFIG, env={SECRET_ENV: "not-a-real-password"})


def _ray_schema() -> dict[str, Any]:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def _project_version() -> str:
    version: str = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return version


# --- the deployment config ---------------------------------------------------------------


def test_cluster_config_values() -> None:
    cfg = _cluster_config()
    assert cfg.instrument == "lsstcam"
    assert cfg.ray_address == "auto"
    assert cfg.source.kind == "kafka"
    assert cfg.alerts.sink == "kafka"
    assert cfg.worker.num_cpus == 1
    assert cfg.worker.memory_mb is not None and 2970 <= cfg.worker.memory_mb <= 3500
    for root in (
        cfg.output_root,
        cfg.raw_root,
        cfg.calib_root,
        cfg.refcat_root,
        cfg.template_root,
    ):
        assert root.startswith("s3://"), root
    assert cfg.detectors is None  # the whole camera: 189 detector workers
    assert cfg.kafka is not None
    assert cfg.kafka.security_protocol == "SASL_SSL"
    assert cfg.kafka.sasl_password is not None
    assert cfg.kafka.sasl_password.get_secret_value() == "not-a-real-password"
    assert cfg.kafka.create_topics is False


def test_cluster_config_needs_the_password_from_the_environment() -> None:
    assert "sasl_password" not in _yaml(CLUSTER_CONFIG)["kafka"]
    with pytest.raises(ValueError, match="sasl_password"):
        load_config(CLUSTER_CONFIG, env={})


# --- the container image -----------------------------------------------------------------


def _dockerfile() -> list[str]:
    """Instructions of deploy/docker/Dockerfile, continuation lines joined."""
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return [ln.strip() for ln in "\n".join(lines).replace("\\\n", " ").splitlines() if ln.strip()]


def test_dockerfile_builds_on_the_ray_image_of_this_ray() -> None:
    lines = _dockerfile()
    args = dict(
        ln.split(None, 1)[1].split("=", 1) for ln in lines if ln.startswith("ARG ") and "=" in ln
    )
    assert args["RAY_VERSION"] == ray.__version__
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert froms, "no FROM"
    for image in froms:
        assert image.startswith("rayproject/ray:"), image
        assert image.replace("${RAY_VERSION}", args["RAY_VERSION"]) == (
            f"rayproject/ray:{ray.__version__}-py311"
        )
    installs = [ln for ln in lines if ln.startswith("RUN ") and "pip install" in ln]
    assert any("ppray" in ln and "ray[default]==${RAY_VERSION}" in ln for ln in installs)
    assert any("ppray instruments" in ln for ln in lines)


def test_dockerfile_runs_as_non_root_and_bakes_in_no_secret() -> None:
    lines = _dockerfile()
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users, "no USER: the image would run as whatever the base says"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    secretive = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.IGNORECASE)
    for ln in lines:
        if ln.startswith(("ENV ", "ARG ", "LABEL ")):
            assert not secretive.search(ln), ln


def test_docker_context_holds_what_the_dockerfile_copies_and_not_the_venv() -> None:
    ignore = [
        ln.strip()
        for ln in (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert ignore[0] == "*", "exclude everything, then re-include the sources"
    included = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    assert not included & {".venv", "build", "ppray-output", "dist"}
    copies = [ln for ln in _dockerfile() if ln.startswith("COPY ") and "--from=" not in ln]
    sources = [s for ln in copies for s in shlex.split(ln)[1:-1] if not s.startswith("--")]
    assert sources
    for src in sources:
        assert src.rstrip("/") in included, f"COPY {src} is not in the build context"
        assert (REPO / src).exists(), src


# --- KubeRay -----------------------------------------------------------------------------


def test_kuberay_manifests_have_kind_api_and_name() -> None:
    expected = {
        "raycluster.yaml": {("ray.io/v1", "RayCluster")},
        "rayjob.yaml": {("ray.io/v1", "RayJob")},
        "configmap.yaml": {("v1", "ConfigMap")},
        "serviceaccount.yaml": {("v1", "ServiceAccount")},
    }
    assert {p.name for p in (DEPLOY / "kuberay").glob("*.yaml")} == set(expected)
    for name, kinds in expected.items():
        docs = _docs(name)
        assert {(d["apiVersion"], d["kind"]) for d in docs} == kinds, name
        for doc in docs:
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


def _dicts(obj: Any) -> list[dict[str, Any]]:
    """Every mapping nested in ``obj`` (itself included)."""
    if isinstance(obj, dict):
        return [obj, *(d for v in obj.values() for d in _dicts(v))]
    if isinstance(obj, list):
        return [d for v in obj for d in _dicts(v)]
    return []


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = pod_template["spec"]["containers"]
    return containers


def test_raycluster_autoscales_detector_workers() -> None:
    spec = _one("raycluster.yaml", "RayCluster")["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["upscalingMode"] in {"Default", "Aggressive", "Conservative"}
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] >= 60
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no detector worker on the head
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    (group,) = spec["workerGroupSpecs"]
    assert group["groupName"] == "detectors"
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    image = f"/ppray:{_project_version()}"
    for template in (head["template"], group["template"]):
        for container in _containers(template):
            assert container["image"].endswith(image), container["image"]
            res = container["resources"]
            # Ray reads its resources from the limits; requests == limits (Guaranteed QoS).
            assert res["requests"] == res["limits"], container["name"]
            assert {"cpu", "memory"} <= set(res["limits"])
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/dev/shm" in mounts, "the object store needs shared memory"


def test_raycluster_worker_pods_fit_the_camera() -> None:
    cfg = _cluster_config()
    n_detectors = len(load_instrument(cfg.instrument).detectors)
    assert n_detectors == 189
    (group,) = _one("raycluster.yaml", "RayCluster")["spec"]["workerGroupSpecs"]
    limits = _containers(group["template"])[0]["resources"]["limits"]
    cpus = _quantity(limits["cpu"])
    object_store = int(group["rayStartParams"]["object-store-memory"])
    # What Ray offers as `memory` on a pod: the limit less the object store, less ~1 GiB
    # for raylet and friends.
    ray_memory = _quantity(limits["memory"]) - object_store - 2**30
    assert cfg.worker.memory_mb is not None
    per_pod = min(
        math.floor(cpus / cfg.worker.num_cpus),
        math.floor(ray_memory / (cfg.worker.memory_mb * MIB)),
    )
    assert per_pod == math.floor(cpus), "memory, not CPU, would limit the workers per pod"
    # Real memory: peak RSS 2.9 GiB per worker plus the object store must fit the limit.
    assert per_pod * 2.9 * 2**30 + object_store < _quantity(limits["memory"])
    needed = math.ceil(n_detectors / per_pod)
    assert needed <= group["maxReplicas"] <= needed + 2  # room for replacements, no more


def test_raycluster_head_gets_the_kafka_secret_and_the_config() -> None:
    cluster = _one("raycluster.yaml", "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]
    (container,) = _containers(head)
    env = {e["name"]: e for e in container["env"]}
    ref = env[SECRET_ENV]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "ppray-kafka", "key": "sasl-password"}
    configmap = _one("configmap.yaml", "ConfigMap")
    volumes = {v["name"]: v for v in head["spec"]["volumes"]}
    config_volumes = [n for n, v in volumes.items() if "configMap" in v]
    assert [volumes[n]["configMap"]["name"] for n in config_volumes] == [
        configmap["metadata"]["name"]
    ]
    account = _one("serviceaccount.yaml", "ServiceAccount")["metadata"]["name"]
    assert head["spec"]["serviceAccountName"] == account
    # No literal secret anywhere in the manifests.
    for name in ("raycluster.yaml", "rayjob.yaml", "configmap.yaml", "serviceaccount.yaml"):
        text = (DEPLOY / "kuberay" / name).read_text()
        assert "sasl_password:" not in text, name
        for doc in _docs(name):
            for item in _dicts(doc):
                if "PASSWORD" in str(item.get("name", "")).upper():
                    assert "value" not in item, f"{name}: {item['name']} has a literal value"


def test_rayjob_runs_ppray_on_the_mounted_config() -> None:
    job = _one("rayjob.yaml", "RayJob")["spec"]
    cluster = _one("raycluster.yaml", "RayCluster")
    assert job["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["ppray", "run", "--config"]
    config_path = Path(argv[3])
    head = cluster["spec"]["headGroupSpec"]["template"]
    mounts = {m["name"]: m["mountPath"] for m in _containers(head)[0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["spec"]["volumes"]}
    (mount,) = [n for n in mounts if "configMap" in volumes.get(n, {})]
    assert config_path.parent == Path(mounts[mount])
    data = _one("configmap.yaml", "ConfigMap")["data"]
    assert config_path.name in data
    assert "runtimeEnvYAML" not in job  # nothing (no secret) shipped through the job
    submitter = _containers(job["submitterPodTemplate"])[0]
    assert submitter["image"] == _containers(head)[0]["image"]


def test_configmap_carries_the_cluster_config(tmp_path: Path) -> None:
    data = _one("configmap.yaml", "ConfigMap")["data"]["deployment.yaml"]
    assert yaml.safe_load(data) == _yaml(CLUSTER_CONFIG)
    path = tmp_path / "deployment.yaml"
    path.write_text(data)
    cfg = load_config(path, env={SECRET_ENV: "not-a-real-password"})
    assert cfg == _cluster_config()


# --- Ray cluster launcher ----------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_validates_against_rays_schema(name: str) -> None:
    config = _yaml(DEPLOY / "cluster-launcher" / f"{name}.yaml")
    jsonschema.validate(config, _ray_schema())
    # What `ray up` does before it talks to the cloud: fill defaults, then validate.
    validate_config(prepare_config(copy.deepcopy(config)))


def test_ray_schema_check_is_not_vacuous() -> None:
    config = _yaml(DEPLOY / "cluster-launcher" / "aws.yaml")
    bad = copy.deepcopy(config)
    bad["idle_timeout_minute"] = 5  # misspelt
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())
    bad = copy.deepcopy(config)
    bad["available_node_types"]["ray.worker.detectors"]["resources"]["CPU"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_starts_ray_and_installs_ppray(name: str) -> None:
    config = _yaml(DEPLOY / "cluster-launcher" / f"{name}.yaml")
    assert config["cluster_name"] == "ppray-lsstcam"
    assert config["upscaling_speed"] > 0
    assert config["idle_timeout_minutes"] >= 5
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head --port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=0.0.0.0" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311"
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "ppray-" in setup
    assert f'"ray[default]=={ray.__version__}"' in setup
    # file_mounts: remote -> local paths relative to the repository root (`ray up` runs there).
    mounts = config["file_mounts"]
    assert (REPO / mounts["/home/ray/ppray-config"] / CLUSTER_CONFIG.name).is_file()
    assert mounts["/home/ray/ppray-dist"] == "./dist"
    assert "/home/ray/ppray-dist/ppray-*.whl" in setup
    assert any("--env-file" in opt for opt in config["docker"]["head_run_options"])
    assert "--env-file" not in " ".join(config["docker"]["run_options"])  # workers: no secret


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_cloud_launcher_sizes_fit_the_camera(name: str) -> None:
    config = _yaml(DEPLOY / "cluster-launcher" / f"{name}.yaml")
    cfg = _cluster_config()
    assert cfg.worker.memory_mb is not None
    n_detectors = len(load_instrument(cfg.instrument).detectors)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # no detector worker on the head
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    (worker,) = workers.values()
    assert worker["min_workers"] == 0
    assert worker["max_workers"] <= config["max_workers"]
    cpus = worker["resources"]["CPU"]
    by_memory = worker["resources"]["memory"] // (cfg.worker.memory_mb * MIB)
    assert by_memory >= cpus, "memory, not CPU, would limit the workers per node"
    assert worker["max_workers"] * cpus >= n_detectors
    # Known machine sizes (vCPU, GiB): the advertised resources must exist on the machine,
    # with the object store (--object-store-memory) and the peak RSS inside it.
    machines = {"m7i.4xlarge": (16, 64), "n2-standard-16": (16, 64)}
    node = worker["node_config"]
    vcpus, gib = machines[node.get("InstanceType") or node.get("machineType")]
    assert cpus == vcpus
    start = " ".join(config["worker_start_ray_commands"])
    found = re.search(r"--object-store-memory=(\d+)", start)
    assert found, "set the worker's object store explicitly: the memory resource assumes it"
    object_store = int(found.group(1))
    assert worker["resources"]["memory"] + object_store < gib * 2**30
    assert cpus * 2.9 * 2**30 + object_store < 0.95 * gib * 2**30  # Ray's OOM threshold


def test_onprem_launcher_lists_machines() -> None:
    config = _yaml(DEPLOY / "cluster-launcher" / "onprem.yaml")
    provider = config["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"] not in provider["worker_ips"]
    assert len(set(provider["worker_ips"])) == len(provider["worker_ips"]) == config["max_workers"]
    # Ray refuses node types for the local provider (it makes its own single type).
    assert "available_node_types" not in config and "head_node_type" not in config
    prepared = prepare_config(copy.deepcopy(config))
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(provider["worker_ips"])
    assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
