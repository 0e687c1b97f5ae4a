"""The Helm chart: lint, schema, rendered manifests valid for Kubernetes (offline), and the rendered service configs
accepted by the services' own config classes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from denoiser_svc.config import DenoiserServiceConfig
from encoder_svc.config import EncoderServiceConfig
from orchestrator.config import OrchestratorConfig
from services.config import from_dict
from vae_svc.config import VaeServiceConfig

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "chitu"
K8S_VERSION = "1.30.0"
CONFIG_CLASSES = {"encoder": EncoderServiceConfig, "denoiser": DenoiserServiceConfig, "vae": VaeServiceConfig}
SERVICES = {"encoder": "chitu.v1.TextEncoderService", "denoiser": "chitu.v1.DenoiserService",
            "vae": "chitu.v1.VaeService"}


@pytest.fixture(scope="module")
def helm() -> str:
    out = subprocess.run(["bash", str(REPO / "scripts" / "get_helm.sh")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return str(REPO / out.stdout.strip().splitlines()[-1])


def render(helm: str, *sets: str) -> list[dict]:
    args = [helm, "template", "rel", str(CHART)]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def render_error(helm: str, *sets: str) -> str:
    args = [helm, "template", "rel", str(CHART)]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode != 0, "rendering should have failed"
    return proc.stderr


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_lint(helm: str) -> None:
    proc = subprocess.run([helm, "lint", str(CHART)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_render_is_valid_kubernetes(helm: str) -> None:
    docs = render(helm)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    deployments = by_kind(docs, "Deployment")
    assert set(deployments) == {"rel-chitu-orchestrator", "rel-chitu-flux-dev-encoder", "rel-chitu-flux-dev-denoiser",
                                "rel-chitu-flux-dev-vae"}
    for name, dep in deployments.items():
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert not container["image"].endswith(":latest") and ":" in container["image"]
        assert container["startupProbe"]["grpc"]["port"] == 50051
        assert container["readinessProbe"]["grpc"]["port"] == 50051
        assert container["args"][:2] == ["serve", name.rsplit("-", 1)[-1]] or name.endswith("orchestrator")
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": 50051, "metrics": 9400}
        assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9400"
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert (gpus is None) == name.endswith("orchestrator")
    for stage, service in SERVICES.items():
        probe = deployments[f"rel-chitu-flux-dev-{stage}"]["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
        assert probe["grpc"]["service"] == service
    assert set(by_kind(docs, "PodDisruptionBudget")) == set(deployments)
    assert not by_kind(docs, "HorizontalPodAutoscaler")


def test_rendered_configs_load_with_the_service_config_classes(helm: str) -> None:
    docs = render(helm, "models[0].name=flux-dev", "models[0].checkpoint=/models/flux",
                  "models[1].name=wan", "models[1].checkpoint=/models/wan",
                  "models[1].denoiser.gpus=4", "models[1].denoiser.parallel.ulysses_degree=2",
                  "models[1].denoiser.parallel.cfg_degree=2", "models[1].denoiser.parallel.ulysses_chunks=3")
    data = by_kind(docs, "ConfigMap")["rel-chitu-config"]["data"]
    orch = from_dict(OrchestratorConfig, yaml.safe_load(data["orchestrator.yaml"]))
    services = set(by_kind(docs, "Service"))
    assert [r.model for r in orch.routes] == ["flux-dev", "wan"]
    for route in orch.routes:
        for stage in ("encoder", "denoiser", "vae"):
            (endpoint,) = getattr(route, stage)
            host, port = endpoint.rsplit(":", 1)
            assert host in services and port == "50051"
    for model in ("flux-dev", "wan"):
        for stage, cls in CONFIG_CLASSES.items():
            cfg = from_dict(cls, yaml.safe_load(data[f"{model}-{stage}.yaml"]))
            assert cfg.model.name == model and cfg.server.host == "0.0.0.0" and cfg.server.metrics_port == 9400
    wan = from_dict(DenoiserServiceConfig, yaml.safe_load(data["wan-denoiser.yaml"]))
    assert (wan.parallel.cfg_degree, wan.parallel.ulysses_degree, wan.parallel.ring_degree) == (2, 2, 1)
    assert wan.parallel.ulysses_chunks == 3
    dep = by_kind(docs, "Deployment")["rel-chitu-wan-denoiser"]
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4


def test_autoscaling_on_queue_depth(helm: str) -> None:
    docs = render(helm, "denoiser.autoscaling.enabled=true", "vae.autoscaling.enabled=true",
                  "orchestrator.autoscaling.enabled=true")
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"rel-chitu-flux-dev-denoiser", "rel-chitu-flux-dev-vae", "rel-chitu-orchestrator"}
    assert hpas["rel-chitu-flux-dev-denoiser"]["spec"]["metrics"][0]["pods"]["metric"]["name"] == "chitu_queue_depth"
    assert hpas["rel-chitu-orchestrator"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    # an autoscaled Deployment leaves replicas to the HPA
    assert "replicas" not in by_kind(docs, "Deployment")["rel-chitu-flux-dev-denoiser"]["spec"]


def test_bad_values_fail_with_a_message(helm: str) -> None:
    assert "must equal cfg_degree*ulysses_degree*ring_degree" in render_error(helm, "denoiser.gpus=2")
    assert "/image/tag" in render_error(helm, "image.tag=latest")
    assert "additional properties 'bogus'" in render_error(helm, "denoiser.bogus=1")
    assert "/denoiser/parallel/cfg_degree" in render_error(helm, "denoiser.parallel.cfg_degree=3")


def test_two_experts_and_shared_pools(helm: str) -> None:
    sets = ["models[0].name=wan22", "models[0].checkpoint=/models/wan22", "models[0].twoExperts=true",
            "models[1].name=wan13", "models[1].checkpoint=/models/wan13", "models[1].encoderFrom=wan22",
            "models[1].vaeFrom=wan22"]
    docs = render(helm, *sets)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert set(by_kind(docs, "Deployment")) == {
        "rel-chitu-orchestrator", "rel-chitu-wan22-encoder", "rel-chitu-wan22-denoiser", "rel-chitu-wan22-denoiser-2",
        "rel-chitu-wan22-vae", "rel-chitu-wan13-denoiser"}
    data = by_kind(docs, "ConfigMap")["rel-chitu-config"]["data"]
    routes = {r.model: r for r in from_dict(OrchestratorConfig, yaml.safe_load(data["orchestrator.yaml"])).routes}
    assert routes["wan22"].denoiser_2 == ["rel-chitu-wan22-denoiser-2:50051"]
    assert routes["wan13"].encoder == routes["wan22"].encoder == ["rel-chitu-wan22-encoder:50051"]
    assert routes["wan13"].vae == ["rel-chitu-wan22-vae:50051"] and not routes["wan13"].denoiser_2
    expert2 = from_dict(DenoiserServiceConfig, yaml.safe_load(data["wan22-denoiser-2.yaml"]))
    assert expert2.component == "transformer_2"
    assert from_dict(DenoiserServiceConfig, yaml.safe_load(data["wan22-denoiser.yaml"])).component == "transformer"
    enc = from_dict(EncoderServiceConfig, yaml.safe_load(data["wan22-encoder.yaml"]))
    assert enc.model.served_names() == ["wan22", "wan13"]
    assert "wan13-encoder.yaml" not in data
    args = by_kind(docs, "Deployment")["rel-chitu-wan22-denoiser-2"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["serve", "denoiser", "--config", "/etc/chitu/wan22-denoiser-2.yaml"]
    err = render_error(helm, *sets[:5], "models[1].encoderFrom=nosuch")
    assert "encoderFrom=nosuch is not a served model" in err


def test_tls_and_token_reach_every_service_and_probes_use_the_health_port(helm: str) -> None:
    docs = render(helm, "security.tls.secretName=chitu-tls", "security.token.secretName=chitu-token")
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    data = by_kind(docs, "ConfigMap")["rel-chitu-config"]["data"]
    orch = from_dict(OrchestratorConfig, yaml.safe_load(data["orchestrator.yaml"]))
    assert orch.stage_client.ca_file == "/etc/chitu-tls/ca.crt" and orch.stage_client.cert_file
    assert orch.stage_client.token_file == "/etc/chitu-token/token"
    servers = [orch.server] + [from_dict(cls, yaml.safe_load(data[f"flux-dev-{stage}.yaml"])).server
                               for stage, cls in CONFIG_CLASSES.items()]
    for server in servers:
        assert server.tls.cert_file == "/etc/chitu-tls/tls.crt" and server.tls.client_ca_file == "/etc/chitu-tls/ca.crt"
        assert server.auth.token_file == "/etc/chitu-token/token" and server.health_port == 50052
    for name, dep in by_kind(docs, "Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == 50052, (name, probe)  # kubelet's gRPC probes: no TLS
        assert {"name": "health", "containerPort": 50052} in container["ports"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["tls"] == "/etc/chitu-tls" and mounts["token"] == "/etc/chitu-token"
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        assert secrets == {"tls": "chitu-tls", "token": "chitu-token"}
    plain = render(helm)  # default: plaintext, probes on the service port, no security config at all
    data = by_kind(plain, "ConfigMap")["rel-chitu-config"]["data"]
    assert "tls" not in yaml.safe_load(data["orchestrator.yaml"])["server"]
    assert "stage_client" not in yaml.safe_load(data["orchestrator.yaml"])
    for dep in by_kind(plain, "Deployment").values():
        assert dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] == 50051


def test_token_without_tls_fails_with_a_message(helm: str) -> None:
    assert "never travels in plaintext" in render_error(helm, "security.token.secretName=chitu-token")
    assert "additional properties 'bogus'" in render_error(helm, "security.tls.bogus=1")


def test_denoisers_keep_compiled_kernels_in_a_volume(helm: str) -> None:
    """The denoiser config points ``runtime.kernel_cache_dir`` at a mounted volume: an emptyDir by default (outlives
    container restarts), a shared claim when one is named (new replicas start warm); off: neither."""
    docs = render(helm, "models[0].name=wan", "models[0].checkpoint=/models/wan",
                  "models[0].denoiser.kernelCache.existingClaim=chitu-kernels")
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    data = by_kind(docs, "ConfigMap")["rel-chitu-config"]["data"]
    cfg = from_dict(DenoiserServiceConfig, yaml.safe_load(data["wan-denoiser.yaml"]))
    assert cfg.runtime.kernel_cache_dir == "/var/cache/chitu/kernels"
    pod = by_kind(docs, "Deployment")["rel-chitu-wan-denoiser"]["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["kernel-cache"] == "/var/cache/chitu/kernels"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["kernel-cache"]["persistentVolumeClaim"]["claimName"] == "chitu-kernels"
    for stage in ("encoder", "vae"):  # nothing compiles there
        spec = by_kind(docs, "Deployment")[f"rel-chitu-wan-{stage}"]["spec"]["template"]["spec"]
        assert "kernel-cache" not in {v["name"] for v in spec["volumes"]}

    default = render(helm)
    pod = by_kind(default, "Deployment")["rel-chitu-flux-dev-denoiser"]["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["kernel-cache"]["emptyDir"] == {"sizeLimit": "20Gi"}

    off = render(helm, "denoiser.kernelCache.enabled=false")
    data = by_kind(off, "ConfigMap")["rel-chitu-config"]["data"]
    assert from_dict(DenoiserServiceConfig, yaml.safe_load(data["flux-dev-denoiser.yaml"])).runtime.kernel_cache_dir == ""
    pod = by_kind(off, "Deployment")["rel-chitu-flux-dev-denoiser"]["spec"]["template"]["spec"]
    assert "kernel-cache" not in {v["name"] for v in pod["volumes"]}
    assert "/denoiser/kernelCache/mountPath" in render_error(helm, "denoiser.kernelCache.mountPath=relative")


def test_denoiser_runtime_settings_reach_the_config(helm: str) -> None:
    """``denoiser.runtime`` (and a model's own ``denoiser.runtime``) become the denoiser's ``runtime`` block, beside the
    kernel cache folder; the chart refuses a ``kernel_cache_dir`` there (``kernelCache`` owns it)."""
    docs = render(helm, "denoiser.runtime.cuda_graphs=true", "denoiser.runtime.warmup_sizes={1024x1024,768x1344}",
                  "models[0].name=wan", "models[0].checkpoint=/models/wan",
                  "models[0].denoiser.runtime.warmup_sizes={832x480x81}")
    data = by_kind(docs, "ConfigMap")["rel-chitu-config"]["data"]
    cfg = from_dict(DenoiserServiceConfig, yaml.safe_load(data["wan-denoiser.yaml"]))
    cfg.runtime.validate()
    assert cfg.runtime.cuda_graphs and cfg.runtime.warmup_sizes == ["832x480x81"]
    assert cfg.runtime.kernel_cache_dir == "/var/cache/chitu/kernels"
    flux = from_dict(DenoiserServiceConfig, yaml.safe_load(render_config(helm, "flux-dev-denoiser.yaml",
                                                                         "denoiser.runtime.cuda_graphs=true",
                                                                         "denoiser.runtime.warmup_sizes={768x1344}")))
    assert flux.runtime.warmup_sizes == ["768x1344"] and flux.runtime.cuda_graphs
    assert "denoiser.runtime.kernel_cache_dir: set denoiser.kernelCache instead" in render_error(
        helm, "denoiser.runtime.kernel_cache_dir=/x")


def render_config(helm: str, name: str, *sets: str) -> str:
    return by_kind(render(helm, *sets), "ConfigMap")["rel-chitu-config"]["data"][name]

