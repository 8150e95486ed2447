"""The Kubernetes manifests in k8s/ and the Ray cluster launcher config, checked without a cluster.

- Generated files equal what scripts/render_k8s.py renders now (serve.yaml and the train configs
  cannot drift from them unnoticed).
- RayCluster, RayJob and RayService manifests validate against KubeRay's CRD schemas
  (../shared/kuberay-crds), plus a walk that rejects keys the schema does not define: Kubernetes
  schemas rarely forbid unknown keys, so a typo like `minReplica` would otherwise pass.
- serveConfigV2 is ray_configs/serve.yaml except for the documented overrides; RayJob entrypoints
  are valid `r1 train` commands whose configs load and fit the job's pods.
- Other manifests have what their kind requires, and every reference between them resolves.
- The dashboard and alerts parse as PromQL and query only metrics r1-cluster exports.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import promql_parser
import pytest
import yaml

from r1.metrics import (
    COMM_SHARE_MAX,
    COMPUTE_BOUND_COMPONENTS,
    COMPUTE_UTILIZATION_MIN,
    MEMORY_UTILIZATION_MAX,
    SERVICE_COMPONENTS,
    exported_series,
    metric_names_in_promql,
)

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRDS = ROOT.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}

_spec = importlib.util.spec_from_file_location("render_k8s", ROOT / "scripts" / "render_k8s.py")
render_k8s = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_k8s)


def _load_manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                found.append((f"{path.relative_to(K8S)}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


MANIFESTS = _load_manifests()
RAY_MANIFESTS = [(name, doc) for name, doc in MANIFESTS if doc["kind"] in CRD_FILES]


def _of_kind(*kinds: str) -> list[dict[str, Any]]:
    return [doc for _, doc in MANIFESTS if doc["kind"] in kinds]


def _named(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in _of_kind(kind) if d["metadata"]["name"] == name]
    return doc


@functools.lru_cache(maxsize=None)
def _crd_schema(kind: str) -> dict[str, Any]:
    path = CRDS / CRD_FILES[kind]
    assert path.is_file(), f"KubeRay CRD {path} is missing (expected ../shared/kuberay-crds next to the project)"
    # The CRDs are ~1 MB each: libyaml's loader when present (seconds faster), read once per kind.
    crd = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


@functools.lru_cache(maxsize=None)
def _validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_crd_schema(kind))


def unknown_keys(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys of `value` where `schema` lists `properties` and allows nothing else."""
    found = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is not None and not extra and not schema.get("x-kubernetes-preserve-unknown-fields"):
            found += [f"{path}.{key}" for key in value if key not in props]
        for key, item in value.items():
            if props and key in props:
                found += unknown_keys(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_keys(item, extra, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += unknown_keys(item, schema["items"], f"{path}[{index}]")
    return found


def schema_problems(doc: dict[str, Any]) -> list[str]:
    schema = _crd_schema(doc["kind"])
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(doc["kind"]).iter_errors(doc)]
    return problems + [f"{key}: not in the {doc['kind']} schema" for key in unknown_keys(doc, schema)]


# -- generated files ----------------------------------------------------------------------------------

def test_generated_manifests_equal_a_fresh_rendering():
    rendered = render_k8s.render()
    stale = [name for name, text in rendered.items() if (K8S / name).read_text(encoding="utf-8") != text]
    assert not stale, f"out of date (run `python scripts/render_k8s.py`): {stale}"
    # A generated file the script no longer produces is a leftover, not a manifest.
    marked = {str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml") if "GENERATED by scripts/render_k8s.py" in p.read_text()}
    assert marked == set(rendered)


# -- KubeRay CRDs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, doc", RAY_MANIFESTS, ids=[name for name, _ in RAY_MANIFESTS])
def test_ray_manifest_validates_against_the_kuberay_crd(name, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert schema_problems(doc) == []


def test_every_ray_kind_is_deployed():
    # The set: a RayService, a RayCluster, a RayJob per training stage, each with a GPU variant.
    names = {doc["metadata"]["name"] for doc in _of_kind(*CRD_FILES)}
    assert {"r1", "r1-gpu", "r1-cluster"} <= names
    assert {f"r1-train-{stage}{gpu}" for stage in ("sft", "reward", "grpo") for gpu in ("", "-gpu")} <= names


def _first(kind: str) -> dict[str, Any]:
    return copy.deepcopy(_of_kind(kind)[0])


@pytest.mark.parametrize("kind, mutate, expected", [
    # A misspelt field the schema does not know (Kubernetes would silently drop it).
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplica=1), ".minReplica: not in"),
    # A typo inside the embedded pod template: a container field.
    ("RayService", lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .update(imagePullPolice="Always"), ".imagePullPolice: not in"),
    # A wrong type: replicas must be an integer.
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="2"), "is not of type 'integer'"),
    # An enum value KubeRay does not accept.
    ("RayJob", lambda d: d["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens"), "is not one of"),
    # A required field left out: every container needs a name.
    ("RayJob", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .pop("name"), "'name' is a required property"),
])
def test_validation_catches_typos_and_wrong_types(kind, mutate, expected):
    doc = _first(kind)
    mutate(doc)
    assert any(expected in problem for problem in schema_problems(doc)), schema_problems(doc)


# -- RayService: the same Serve config as ray_configs/serve.yaml ----------------------------------------------

def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{path}.{index}" if path else str(index))
    else:
        yield path, value


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_serve_config_v2_is_serve_yaml_plus_the_documented_overrides(gpu):
    from ray.serve.schema import ServeDeploySchema

    service = _named("RayService", "r1-gpu" if gpu else "r1")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # what the dashboard's serve deploy API accepts
    on_k8s = dict(_leaves(serve_config))
    local = dict(_leaves(yaml.safe_load((ROOT / "ray_configs" / "serve.yaml").read_text())))
    differing = {path for path in on_k8s.keys() | local.keys() if on_k8s.get(path, "<absent>") != local.get(path, "<absent>")}
    overrides = render_k8s.serve_overrides(gpu)
    assert differing == {path for path, _, _ in overrides}
    for path, value, why in overrides:
        assert on_k8s[path] == value and len(why) > 20, path
    # http_options.host 0.0.0.0 is allowed only because the API keys come from the Secret, always.
    for group in _ray_groups(service):
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        ref = env["R1_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "r1-secrets" and not ref.get("optional", False)


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec a Ray kind carries (itself, rayClusterConfig, rayClusterSpec)."""
    return {"RayCluster": lambda: doc["spec"], "RayService": lambda: doc["spec"]["rayClusterConfig"],
            "RayJob": lambda: doc["spec"]["rayClusterSpec"]}[doc["kind"]]()


def _ray_groups(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _cluster_spec(doc)
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def _pod_resources(group: dict[str, Any]) -> tuple[float, int]:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return float(limits["cpu"]), int(limits.get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("name", ["r1", "r1-gpu"])
def test_rayservice_pods_scale_with_the_serve_replicas(name):
    # The guide's autoscaling (minReplicas 2, maxReplicas 10): Serve replicas 2-10, and pods enough for them.
    from r1.config import ServeConfig

    service = _named("RayService", name)
    config = ServeConfig.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"])
    assert (config.llm.min_replicas, config.llm.max_replicas) == (2, 10)
    assert (config.ingress.min_replicas, config.ingress.max_replicas) == (2, 10)
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas live on workers
    (workers,) = cluster["workerGroupSpecs"]
    assert (workers["minReplicas"], workers["maxReplicas"]) == (2, 10)
    cpus, gpus = _pod_resources(workers)
    per_pod = int(gpus // config.llm.num_gpus) if config.llm.num_gpus else int(cpus // config.llm.num_cpus)
    # Exactly one LLMServer replica per worker pod: 2 -> 10 replicas means 2 -> 10 pods, with room for the ingress.
    assert per_pod == 1
    assert config.llm.num_cpus + config.ingress.num_cpus <= cpus


# -- RayJobs: valid `r1 train` commands that fit their pods ---------------------------------------------------

@pytest.mark.parametrize("job", _of_kind("RayJob"), ids=lambda j: j["metadata"]["name"])
def test_rayjob_entrypoint_is_a_valid_training_command_that_fits_its_cluster(job):
    from cluster.cli import build_parser
    from cluster.train.driver import load_train_config

    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "r1"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "train" and job["metadata"]["name"].startswith(f"r1-train-{args.stage}")
    config_path = ROOT / Path(args.config).relative_to(render_k8s.APP_DIR)  # the image holds the repo's file
    config = load_train_config(args.stage, str(config_path), args.set or [])
    # Runs and their checkpoints go to the shared volume, mounted on every pod of the job's cluster.
    assert config.checkpoint.storage_path.startswith("/data/")
    groups = _ray_groups(job)
    for group in groups:
        mounts = group["template"]["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "r1-data", "mountPath": "/data"} in mounts
    (workers,) = groups[1:]
    cpus, gpus = _pod_resources(workers)
    per_worker = config.scaling.resources_per_worker or {}
    assert config.scaling.num_workers <= workers["replicas"] == workers["minReplicas"]
    assert per_worker.get("CPU", 1) <= cpus
    gpu_job = job["metadata"]["name"].endswith("-gpu")
    assert config.scaling.use_gpu is gpu_job
    assert (gpus >= per_worker.get("GPU", 1)) if gpu_job else gpus == 0
    # Finished jobs free their cluster; a retry resumes from the checkpoint on /data.
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load((ROOT / "ray_configs" / "runtime_env.yaml").read_text())
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"env_vars": runtime_env["env_vars"]}


# -- the other manifests ----------------------------------------------------------------------------------------

REQUIRED_FIELDS = {
    "Secret": ["type", "stringData"],
    "PersistentVolumeClaim": ["spec.accessModes", "spec.resources.requests.storage"],
    "ConfigMap": ["data"],
    "Deployment": ["spec.selector.matchLabels", "spec.template.metadata.labels", "spec.template.spec.containers"],
    "Service": ["spec.selector", "spec.ports"],
    "NetworkPolicy": ["spec.podSelector", "spec.ingress"],
    "Job": ["spec.template.spec.containers", "spec.template.spec.restartPolicy"],
    "PodMonitor": ["spec.selector.matchLabels", "spec.podMetricsEndpoints"],
    "PrometheusRule": ["spec.groups"],
}
API_VERSIONS = {"Secret": "v1", "PersistentVolumeClaim": "v1", "ConfigMap": "v1", "Service": "v1",
                "Deployment": "apps/v1", "Job": "batch/v1", "NetworkPolicy": "networking.k8s.io/v1",
                "PodMonitor": "monitoring.coreos.com/v1", "PrometheusRule": "monitoring.coreos.com/v1",
                "RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "RayService": "ray.io/v1"}


def _get(doc: dict[str, Any], dotted: str) -> Any:
    value: Any = doc
    for part in dotted.split("."):
        value = value[part]
    return value


@pytest.mark.parametrize("name, doc", MANIFESTS, ids=[name for name, _ in MANIFESTS])
def test_manifest_has_the_fields_its_kind_requires(name, doc):
    assert API_VERSIONS[doc["kind"]] == doc["apiVersion"]
    # DNS-1123, and short: KubeRay derives names like <name>-raycluster-abcde-head-svc that must fit 63.
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 30
    assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "r1-cluster"
    for field in REQUIRED_FIELDS.get(doc["kind"], []):
        assert _get(doc, field), f"{name}: {field} is empty"
    if doc["kind"] in ("Deployment", "Job"):
        # Pod templates of plain workloads are held to the same PodTemplateSpec schema as the Ray pods.
        pod_schema = _crd_schema("RayCluster")["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
        template = doc["spec"]["template"]
        assert [e.message for e in jsonschema.Draft7Validator(pod_schema).iter_errors(template)] == []
        assert unknown_keys(template, pod_schema) == []
    if doc["kind"] == "Deployment":
        assert doc["spec"]["selector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()


def _containers() -> Iterator[dict[str, Any]]:
    for doc in _of_kind(*CRD_FILES):
        for group in _ray_groups(doc):
            yield from group["template"]["spec"]["containers"]
    for doc in _of_kind("Deployment", "Job"):
        yield from doc["spec"]["template"]["spec"]["containers"]


def test_every_reference_between_manifests_resolves():
    secrets = {doc["metadata"]["name"]: set(doc["stringData"]) for doc in _of_kind("Secret")}
    for container in _containers():
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets.get(ref["name"], set()), ref
    claims = {doc["metadata"]["name"] for doc in _of_kind("PersistentVolumeClaim")}
    pod_specs = [g["template"]["spec"] for d in _of_kind(*CRD_FILES) for g in _ray_groups(d)]
    pod_specs += [d["spec"]["template"]["spec"] for d in _of_kind("Deployment", "Job")]
    for pod in pod_specs:
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
    services = {f"{d['metadata']['name']}:{p['port']}" for d in _of_kind("Service") for p in d["spec"]["ports"]}
    for doc in _of_kind(*CRD_FILES):
        spec = _cluster_spec(doc)
        assert spec["authOptions"] == {"mode": "token", "secretName": "r1-ray-auth"}
        assert "auth_token" in secrets["r1-ray-auth"]
        if "gcsFaultToleranceOptions" in spec:
            assert spec["gcsFaultToleranceOptions"]["redisAddress"] in services
    for service in _of_kind("RayService"):
        url = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["sessions"]["backend_url"]
        assert re.fullmatch(r"redis://([^/]+)/\d+", url).group(1) in services
    deployments = _of_kind("Deployment")
    for service in _of_kind("Service"):
        assert any(service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in deployments), service["metadata"]["name"]


def test_redis_admits_the_ray_pods_and_the_pod_monitor_finds_their_ports():
    (policy,) = _of_kind("NetworkPolicy")
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    (monitor,) = _of_kind("PodMonitor")
    # ray.io/* labels are added by KubeRay; the rest must be on our pod templates.
    selected = {k: v for k, v in monitor["spec"]["selector"]["matchLabels"].items() if not k.startswith("ray.io/")}
    head_ports, worker_ports = set(), set()
    for doc in _of_kind(*CRD_FILES):
        for index, group in enumerate(_ray_groups(doc)):
            labels = group["template"]["metadata"]["labels"]
            assert allowed.items() <= labels.items() and selected.items() <= labels.items()
            ports = {p["name"] for p in group["template"]["spec"]["containers"][0]["ports"]}
            (worker_ports if index else head_ports).add(frozenset(ports))
    endpoints = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert all(endpoints <= ports for ports in head_ports)
    assert all("metrics" in ports for ports in worker_ports)


# -- dashboard and alerts ---------------------------------------------------------------------------------------

def _parse_promql(expr: str) -> None:
    # Grafana's variables are not PromQL; substitute what Grafana would.
    promql_parser.parse(expr.replace("$__rate_interval", "1m").replace("$cluster", ".*"))


def test_dashboard_configmap_embeds_the_dashboard_json():
    configmap = _named("ConfigMap", "r1-grafana-dashboard")
    text = (K8S / "grafana" / "r1-dashboard.json").read_text(encoding="utf-8")
    assert configmap["data"]["r1-dashboard.json"] == text
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_dashboard_queries_parse_and_use_only_exported_metrics():
    dashboard = json.loads((K8S / "grafana" / "r1-dashboard.json").read_text(encoding="utf-8"))
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            _parse_promql(target["expr"])
            used |= metric_names_in_promql(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            used |= metric_names_in_promql(variable["query"])
    assert used and used <= exported_series(), used - exported_series()
    # The guide's three health indicators each have a panel.
    assert {"ray_r1_memory_utilization_ratio", "ray_r1_compute_utilization_ratio", "ray_r1_train_comm_share_ratio"} <= used


PROMETHEUS_TEMPLATE_FUNCTIONS = {"humanize", "humanize1024", "humanizeDuration", "humanizePercentage",
                                 "humanizeTimestamp", "printf", "title", "toUpper", "toLower", "first", "value", "label"}


@pytest.mark.parametrize("alert, metric, comparison", [
    # Guide 2.2: memory use should stay below 85 %.
    ("R1MemoryUtilizationHigh", "ray_r1_memory_utilization_ratio", (">=", MEMORY_UTILIZATION_MAX)),
    # Guide 2.2: compute utilization should be above 70 % (alert when it stays below).
    ("R1ComputeUtilizationLow", "ray_r1_compute_utilization_ratio", ("<", COMPUTE_UTILIZATION_MIN)),
    # Guide 2.2: communication overhead should stay below 15 %.
    ("R1CommunicationShareHigh", "ray_r1_train_comm_share_ratio", (">=", COMM_SHARE_MAX)),
])
def test_alert_rules_encode_the_guides_thresholds(alert, metric, comparison):
    (rules,) = _of_kind("PrometheusRule")
    rule = next(r for g in rules["spec"]["groups"] for r in g["rules"] if r.get("alert") == alert)
    _parse_promql(rule["expr"])
    names = metric_names_in_promql(rule["expr"])
    assert metric in names and names <= exported_series(), names - exported_series()
    found = {(op, float(value)) for op, value in re.findall(r"(>=|<=|==|!=|<|>)\s*([0-9.]+)", rule["expr"])}
    assert comparison in found
    assert re.fullmatch(r"\d+m", rule["for"]) and rule["labels"]["severity"] in {"info", "warning", "critical"}
    for text in rule["annotations"].values():
        for function in re.findall(r"\|\s*(\w+)", text):
            assert function in PROMETHEUS_TEMPLATE_FUNCTIONS, function


def test_compute_alert_watches_the_compute_bound_components_and_prefers_gpu_utilization():
    (rules,) = _of_kind("PrometheusRule")
    rule = next(r for g in rules["spec"]["groups"] for r in g["rules"] if r.get("alert") == "R1ComputeUtilizationLow")
    expr = rule["expr"]
    selectors = re.findall(r"ray_r1_compute_utilization_ratio\{([^}]*)\}", expr)
    assert len(selectors) == expr.count("ray_r1_compute_utilization_ratio") == 2  # no unfiltered use
    devices = set()
    for selector in selectors:
        matchers = dict(re.findall(r'(\w+)=~?"([^"]*)"', selector))
        # Not the ingress, safety filter, session store or code validator: they wait by design.
        assert set(matchers["component"].split("|")) == set(COMPUTE_BOUND_COMPONENTS)
        devices.add(matchers["device"])
    assert devices == {"cuda.*", "cpu"}
    # A component's CPU series counts only where it has no GPU series (a GPU process keeps ~1 core busy).
    assert re.search(r'device=~"cuda\.\*"\}\[30m\]\)\)\s*or on \(ray_io_cluster, component\)', expr)


def test_every_resource_reporter_component_is_classified_for_the_compute_alert():
    sources = [path for folder in ("actors", "cluster", "r1") for path in (ROOT / folder).rglob("*.py")]
    used = {name for path in sources
            for name in re.findall(r'start_resource_reporter\(\s*"(\w+)"', path.read_text(encoding="utf-8"))}
    assert used == set(COMPUTE_BOUND_COMPONENTS) | set(SERVICE_COMPONENTS)
    assert not set(COMPUTE_BOUND_COMPONENTS) & set(SERVICE_COMPONENTS)


# -- Ray cluster launcher ----------------------------------------------------------------------------------------

def test_cluster_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "ray_configs" / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs first
    types = config["available_node_types"]
    head = types.pop(config["head_node_type"])
    assert head["resources"] == {"CPU": 0}
    # Autoscaling worker types, CPU and GPU, that scale from zero.
    assert set(types) == {"cpu_worker", "gpu_worker"}
    assert types["cpu_worker"]["node_config"]["InstanceType"].startswith(("m", "c", "r"))  # AWS CPU families
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))  # AWS GPU families
    assert all(t["min_workers"] == 0 < t["max_workers"] for t in types.values())
    # Token authentication on every node, with the token synced from the launching machine.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command


def test_one_ray_version_and_a_buildable_image():
    import ray

    dockerfile = (K8S / "Dockerfile").read_text(encoding="utf-8")
    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:([0-9.]+)-py311$", dockerfile, re.M).group(1)
    launcher = yaml.safe_load((ROOT / "ray_configs" / "cluster.yaml").read_text())["docker"]["image"]
    # Client, image, KubeRay rayVersion and launcher nodes must run the same Ray.
    assert render_k8s.RAY_VERSION == ray.__version__ == base == re.search(r":([0-9.]+)-", launcher).group(1)
    assert all(_cluster_spec(doc)["rayVersion"] == ray.__version__ for doc in _of_kind(*CRD_FILES))
    # Everything the image build copies exists, and the RayJobs' config directory is among it.
    copied = [name for line in re.findall(r"^COPY --chown=\S+ (.+)$", dockerfile, re.M) for name in line.split()[:-1]]
    assert "ray_configs" in copied
    for name in copied:
        assert (ROOT / name).exists(), name
