"""Render r1-cluster's KubeRay manifests in k8s/ from ray_configs/, so both say the same thing.

    python scripts/render_k8s.py            # rewrite the generated files in k8s/
    python scripts/render_k8s.py --check    # exit 1 if a committed file differs from its rendering
    python scripts/render_k8s.py --image REGISTRY/r1-cluster:0.1.0 --gpu-image REGISTRY/r1-cluster:0.1.0-gpu \
        --out-dir deploy/                   # the same manifests for your own image names

Generated: the RayService (CPU and GPU), the RayCluster, a RayJob per training stage (CPU and GPU),
the model download Job and the Grafana dashboard ConfigMap. Written by hand and not touched here:
secret.example.yaml, storage.yaml, redis.yaml, monitoring/, grafana/r1-dashboard.json, Dockerfile.

A RayService's serveConfigV2 is ray_configs/serve.yaml with exactly the overrides listed in
SERVE_OVERRIDES plus CPU_SERVE_OVERRIDES or GPU_SERVE_OVERRIDES, each with the reason it exists on
Kubernetes; tests/test_k8s_manifests.py checks that nothing else differs. RayJob entrypoints run
the ray_configs/train_*.yaml files shipped in the image with the --set overrides in STAGES.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SERVE_YAML = ROOT / "ray_configs" / "serve.yaml"
RUNTIME_ENV_YAML = ROOT / "ray_configs" / "runtime_env.yaml"
DASHBOARD_JSON = K8S / "grafana" / "r1-dashboard.json"

RAY_VERSION = "2.60.0"
IMAGE = "r1-cluster:0.1.0"
GPU_IMAGE = "r1-cluster:0.1.0-gpu"
APP_DIR = "/home/ray/r1-cluster"  # where k8s/Dockerfile puts the project (ray_configs/ included)
DATA_DIR = "/data"  # the r1-data volume (k8s/storage.yaml)
RUNS_DIR = f"{DATA_DIR}/r1-runs"
GPU_MODEL = "DeepSeek-R1-Distill-Qwen-1.5B"
GPU_MODEL_REPO = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
GPU_MODEL_DIR = f"{DATA_DIR}/models/{GPU_MODEL}"
PART_OF = {"app.kubernetes.io/part-of": "r1-cluster"}
API_KEYS_SECRET = "r1-secrets"
RAY_AUTH_SECRET = "r1-ray-auth"
REDIS = "r1-redis:6379"

# (dotted path in the Serve config, value, why it differs on Kubernetes)
SERVE_OVERRIDES: list[tuple[str, Any, str]] = [
    ("http_options.host", "0.0.0.0",
     "the Serve Service reaches the proxy on the pod IP; safe because every Ray container gets R1_API_KEYS "
     "from the r1-secrets Secret (not optional), so the API always asks for a key"),
    ("applications.0.args.sessions.backend_url", f"redis://{REDIS}/0",
     "SessionStore actors run on any pod, so sessions live in Redis (k8s/redis.yaml, append-only, own volume)"),
    ("applications.0.args.require_api_keys", True,
     "the API listens on the pod IP: a blank R1_API_KEYS in the Secret makes the ingress refuse to start "
     "instead of serving an open API"),
    ("applications.0.args.code_validator.codecheck.isolation", "bwrap",
     "requests' tests and the model's code are untrusted; in a pod the Ray processes all run as user ray, so "
     "the rlimits fallback would run that code as the uid that can read RAY_AUTH_TOKEN and R1_API_KEYS from "
     "/proc; the image ships bubblewrap, and a cluster that forbids unprivileged user namespaces fails the "
     "CodeValidator at start (set code_validator: null there) rather than running code without isolation"),
]
CPU_SERVE_OVERRIDES: list[tuple[str, Any, str]] = [
    ("applications.0.args.llm.num_cpus", 3,
     "one LLMServer replica per 4-CPU worker pod (a core left for ingress, proxy and sessions), so Serve's "
     "replicas 2 -> 10 drive the Ray autoscaler's pods 2 -> 10"),
]
GPU_SERVE_OVERRIDES: list[tuple[str, Any, str]] = [
    ("applications.0.args.model.model", GPU_MODEL_DIR,
     "a real checkpoint on the r1-data volume (k8s/model-download-job.yaml puts it there)"),
    ("applications.0.args.served_model_name", GPU_MODEL, "clients name the model, not its path on the volume"),
    ("applications.0.args.llm.num_gpus", 1,
     "one GPU per LLMServer replica; the Ray autoscaler adds GPU pods as Serve scales replicas 2 -> 10"),
]

# Training stages: (stage, --set overrides on CPU, on GPU). Every run writes to the r1-data volume;
# GPU runs have their own run names so that they never resume a CPU run's checkpoint.
STAGES: list[tuple[str, list[str], list[str]]] = [
    ("sft", [], [f"model.model={GPU_MODEL_DIR}", "checkpoint.run_name=r1-sft-gpu"]),
    ("reward", [f"data.path={DATA_DIR}/datasets/preferences.jsonl"],
     [f"data.path={DATA_DIR}/datasets/preferences.jsonl", f"model.model={GPU_MODEL_DIR}",
      "checkpoint.run_name=r1-reward-gpu"]),
    ("grpo", [f"model.model={RUNS_DIR}/r1-sft/final"],
     [f"model.model={RUNS_DIR}/r1-sft-gpu/final", "checkpoint.run_name=r1-grpo-gpu"]),
]
# Per-worker resources fit the worker pods below (a core or two left for Ray itself).
CPU_TRAIN_SETS = [f"checkpoint.storage_path={RUNS_DIR}", "scaling.resources_per_worker.CPU=3"]
GPU_TRAIN_SETS = [f"checkpoint.storage_path={RUNS_DIR}", "scaling.use_gpu=true", "scaling.resources_per_worker.CPU=6",
                  "scaling.resources_per_worker.GPU=1", "precision=bf16"]

# Pod sizes: (cpu, memory, gpus). Requests equal limits, as KubeRay recommends for Ray pods.
HEAD = ("2", "8Gi", 0)
CPU_WORKER = ("4", "16Gi", 0)
GPU_WORKER = ("8", "64Gi", 1)
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": 8080,
              "as-metrics": 44217, "dash-metrics": 44227}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# The image runs as user ray (uid 1000, group users = 100): the r1-data volume is made writable for
# that group (the ownership change runs only when the volume's root does not match already).
VOLUME_ACCESS = {"fsGroup": 100, "fsGroupChangePolicy": "OnRootMismatch"}


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.0.b` in nested dicts/lists, creating missing mappings."""
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    node[last] = value


def serve_overrides(gpu: bool) -> list[tuple[str, Any, str]]:
    return SERVE_OVERRIDES + (GPU_SERVE_OVERRIDES if gpu else CPU_SERVE_OVERRIDES)


def serve_config(gpu: bool) -> dict[str, Any]:
    from r1.config import ServeConfig, parse_config

    config = yaml.safe_load(SERVE_YAML.read_text(encoding="utf-8"))
    for path, value, _why in serve_overrides(gpu):
        set_path(config, path, value)
    for app in config["applications"]:
        parse_config(ServeConfig, app.get("args"), source=f"serveConfigV2 of the {'GPU ' if gpu else ''}RayService")
    return config


def job_env_vars() -> dict[str, str]:
    return yaml.safe_load(RUNTIME_ENV_YAML.read_text(encoding="utf-8"))["env_vars"]


def container(name: str, image: str, size: tuple[str, str, int], ports: dict[str, int],
              api_keys: bool) -> dict[str, Any]:
    cpu, memory, gpus = size
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    spec: dict[str, Any] = {"name": name, "image": image, "imagePullPolicy": "IfNotPresent",
                            "resources": {"requests": dict(limits), "limits": limits},
                            "ports": [{"name": port_name, "containerPort": port} for port_name, port in ports.items()],
                            "volumeMounts": [{"name": "r1-data", "mountPath": DATA_DIR},
                                             {"name": "dshm", "mountPath": "/dev/shm"}]}
    if api_keys:
        spec["env"] = [{"name": "R1_API_KEYS",
                        "valueFrom": {"secretKeyRef": {"name": API_KEYS_SECRET, "key": "R1_API_KEYS"}}}]
    return spec


def pod_template(name: str, image: str, size: tuple[str, str, int], ports: dict[str, int], component: str,
                 api_keys: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "securityContext": VOLUME_ACCESS,
        "containers": [container(name, image, size, ports, api_keys)],
        "volumes": [{"name": "r1-data", "persistentVolumeClaim": {"claimName": "r1-data"}},
                    # Ray's object store and NCCL use shared memory; the container default is 64 MiB.
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if size[2]:
        spec["tolerations"] = [GPU_TOLERATION]
    return {"metadata": {"labels": {**PART_OF, "app.kubernetes.io/component": component}}, "spec": spec}


def worker_group(group: str, image: str, size: tuple[str, str, int], replicas: int, min_replicas: int,
                 max_replicas: int, component: str, api_keys: bool) -> dict[str, Any]:
    return {"groupName": group, "replicas": replicas, "minReplicas": min_replicas, "maxReplicas": max_replicas,
            "rayStartParams": {"metrics-export-port": "8080"},
            "template": pod_template("ray-worker", image, size, {"metrics": 8080}, component, api_keys)}


def cluster_spec(image: str, workers: list[dict[str, Any]], component: str, *, autoscaling: bool,
                 gcs_fault_tolerance: bool, api_keys: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        # Ray token auth with a token the user creates (secret.example.yaml), so clients can read it.
        "authOptions": {"mode": "token", "secretName": RAY_AUTH_SECRET},
    }
    if autoscaling:
        spec["enableInTreeAutoscaling"] = True
        spec["autoscalerOptions"] = {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 120,
            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}},
        }
    if gcs_fault_tolerance:
        spec["gcsFaultToleranceOptions"] = {"redisAddress": REDIS}
    spec["headGroupSpec"] = {
        # num-cpus 0: no tasks, actors or replicas on the head; it runs GCS, the dashboard, the
        # Serve controller and the job drivers only.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0", "metrics-export-port": "8080"},
        "template": pod_template("ray-head", image, HEAD, HEAD_PORTS, component, api_keys),
    }
    spec["workerGroupSpecs"] = workers
    return spec


def metadata(name: str, component: str) -> dict[str, Any]:
    return {"name": name, "labels": {**PART_OF, "app.kubernetes.io/component": component}}


def rayservice(image: str, gpu: bool) -> dict[str, Any]:
    config = serve_config(gpu)
    workers = ([worker_group("gpu", image, GPU_WORKER, 2, 2, 10, "serving", True)] if gpu else
               [worker_group("cpu", image, CPU_WORKER, 2, 2, 10, "serving", True)])
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": metadata("r1-gpu" if gpu else "r1", "serving"),
        "spec": {
            "serveConfigV2": yaml.safe_dump(config, sort_keys=False, width=1000),
            "rayClusterConfig": cluster_spec(image, workers, "serving", autoscaling=True, gcs_fault_tolerance=True,
                                             api_keys=True),
        },
    }


def raycluster(image: str, gpu_image: str) -> dict[str, Any]:
    workers = [worker_group("cpu", image, CPU_WORKER, 1, 0, 10, "cluster", True),
               worker_group("gpu", gpu_image, GPU_WORKER, 0, 0, 4, "cluster", True)]
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": metadata("r1-cluster", "cluster"),
            "spec": cluster_spec(image, workers, "cluster", autoscaling=True, gcs_fault_tolerance=True,
                                 api_keys=True)}


def train_entrypoint(stage: str, sets: list[str]) -> str:
    command = ["r1", "train", stage, "--config", f"{APP_DIR}/ray_configs/train_{stage}.yaml"]
    for item in sets:
        command += ["--set", item]
    return shlex.join(command)


def rayjob(stage: str, stage_sets: list[str], gpu: bool, image: str) -> dict[str, Any]:
    sets = (GPU_TRAIN_SETS if gpu else CPU_TRAIN_SETS) + stage_sets
    workers = [worker_group("gpu" if gpu else "cpu", image, GPU_WORKER if gpu else CPU_WORKER, 2, 2, 2, "training",
                            False)]
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": metadata(f"r1-train-{stage}{'-gpu' if gpu else ''}", "training"),
        "spec": {
            "entrypoint": train_entrypoint(stage, sets),
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": job_env_vars()}, sort_keys=False),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "activeDeadlineSeconds": 172800,
            # A retry runs on a fresh cluster and resumes from the run's last checkpoint on /data.
            "backoffLimit": 2,
            "submissionMode": "K8sJobMode",
            "rayClusterSpec": cluster_spec(image, workers, "training", autoscaling=False, gcs_fault_tolerance=False,
                                           api_keys=False),
        },
    }


def model_download_job(image: str) -> dict[str, Any]:
    script = ("from huggingface_hub import snapshot_download; import os; "
              "snapshot_download(repo_id=os.environ['MODEL_REPO'], local_dir=os.environ['MODEL_DIR'])")
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": metadata("r1-model-download", "model"),
        "spec": {
            "backoffLimit": 3, "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": {**PART_OF, "app.kubernetes.io/component": "model"}},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "securityContext": VOLUME_ACCESS,
                    "containers": [{
                        "name": "download", "image": image, "command": ["python", "-c", script],
                        # The one pod that needs the network: it fetches the checkpoint once.
                        "env": [{"name": "HF_HUB_OFFLINE", "value": "0"}, {"name": "MODEL_REPO", "value": GPU_MODEL_REPO},
                                {"name": "MODEL_DIR", "value": GPU_MODEL_DIR}],
                        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
                        "volumeMounts": [{"name": "r1-data", "mountPath": DATA_DIR}],
                    }],
                    "volumes": [{"name": "r1-data", "persistentVolumeClaim": {"claimName": "r1-data"}}],
                },
            },
        },
    }


def dashboard_configmap() -> dict[str, Any]:
    text = DASHBOARD_JSON.read_text(encoding="utf-8")
    json.loads(text)  # fail here, not in Grafana
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "r1-grafana-dashboard", "labels": {**PART_OF, "grafana_dashboard": "1"}},
            "data": {"r1-dashboard.json": text}}


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (serveConfigV2, dashboard JSON) and indented lists."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> Any:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _represent_str)


def dump(header: str, manifest: dict[str, Any]) -> str:
    lines = ["# GENERATED by scripts/render_k8s.py; do not edit. Change its sources (named below) or the script,",
             "# then run `python scripts/render_k8s.py` (tests/test_k8s_manifests.py fails until you do)."]
    lines += [f"# {line}" if line else "#" for line in header.splitlines()]
    # No folding: an entrypoint stays one line, as the shell that runs it sees it.
    body = yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=1_000_000, allow_unicode=True)
    return "\n".join(lines) + "\n" + body


def render(image: str = IMAGE, gpu_image: str = GPU_IMAGE) -> dict[str, str]:
    """{path relative to k8s/: file text} of every generated manifest."""
    def listed(gpu: bool) -> str:
        return "\n".join(f"  {path} = {value!r}: {why}" for path, value, why in serve_overrides(gpu))

    files = {
        "rayservice.yaml": dump(
            "RayService r1: the OpenAI-compatible API on CPU workers (autoscaling pods 2-10, Serve replicas 2-10).\n"
            f"Sources: ray_configs/serve.yaml, with these Kubernetes overrides:\n{listed(False)}",
            rayservice(image, gpu=False)),
        "rayservice-gpu.yaml": dump(
            f"RayService r1-gpu: {GPU_MODEL} on GPU workers (one GPU per LLMServer replica, pods 2-10).\n"
            f"Sources: ray_configs/serve.yaml, with these Kubernetes overrides:\n{listed(True)}",
            rayservice(gpu_image, gpu=True)),
        "raycluster.yaml": dump(
            "RayCluster r1-cluster: a long-lived cluster for `r1 submit` / `ray job submit` / `serve deploy`,\n"
            "with autoscaling CPU (0-10) and GPU (0-4) worker groups.", raycluster(image, gpu_image)),
        "model-download-job.yaml": dump(
            f"Job r1-model-download: fetch {GPU_MODEL_REPO} into {GPU_MODEL_DIR} on the r1-data volume\n"
            "(the GPU RayService and GPU RayJobs load it from there).", model_download_job(image)),
        "grafana/dashboard-configmap.yaml": dump(
            "ConfigMap r1-grafana-dashboard: the Grafana dashboard, for the sidecar of kube-prometheus-stack's\n"
            "Grafana (label grafana_dashboard: \"1\"). Sources: k8s/grafana/r1-dashboard.json.", dashboard_configmap()),
    }
    for stage, cpu_sets, gpu_sets in STAGES:
        for gpu in (False, True):
            where = "two GPU workers (NCCL, bf16)" if gpu else "two CPU workers (gloo)"
            files[f"rayjobs/train-{stage}{'-gpu' if gpu else ''}.yaml"] = dump(
                f"RayJob: `r1 train {stage}` on a fresh Ray cluster of {where}, deleted 10 minutes after the job ends.\n"
                f"Sources: ray_configs/train_{stage}.yaml (in the image), ray_configs/runtime_env.yaml (env_vars).",
                rayjob(stage, gpu_sets if gpu else cpu_sets, gpu, gpu_image if gpu else image))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    parser.add_argument("--image", default=IMAGE, help=f"CPU image (default {IMAGE})")
    parser.add_argument("--gpu-image", default=GPU_IMAGE, help=f"GPU image (default {GPU_IMAGE})")
    parser.add_argument("--out-dir", type=Path, default=K8S, help="where to write (default k8s/)")
    args = parser.parse_args(argv)
    files = render(args.image, args.gpu_image)
    if args.check:
        stale = [name for name, text in files.items()
                 if not (args.out_dir / name).is_file() or (args.out_dir / name).read_text(encoding="utf-8") != text]
        for name in stale:
            print(f"{args.out_dir / name} is out of date; run: python scripts/render_k8s.py", file=sys.stderr)
        return 1 if stale else 0
    for name, text in files.items():
        path = args.out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
