"""deploy/ validated offline: every YAML document against a schema, then the cross-references no schema can see.

Schemas: core kinds with kubernetes-validate (the Kubernetes OpenAPI schemas bundled in its wheel, strict: unknown
fields fail), the Gateway API / InferencePool / kustomization / EndpointPickerConfig documents with jsonschema against
deploy/schemas/ (sources in deploy/schemas/README.md). Cross-references: selectors against pod labels, ports, probe
paths against the frontend's real routes, env var names against the code that reads them, ConfigMap/Secret keys,
the HTTPRoute -> InferencePool -> endpoint picker chain, the picker's metric names against what /metrics emits, and the
GPU overlay rendered and validated. Each check is a function returning its problems; `test_check_catches` breaks a
copy of the manifests once per check and asserts that the check notices. No cluster, no network, no server started.
"""

from __future__ import annotations

import ast
import copy
import json
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SCHEMAS = DEPLOY / "schemas"
BASE = DEPLOY / "base"  # the complete CPU deployment; deploy/gpu/ is its overlay
K8S_VERSION = "1.31.0"  # the oldest Kubernetes these manifests target; the pinned wheel bundles 1.25 to 1.37

# Kinds outside core Kubernetes: (apiVersion, kind) -> schema file in deploy/schemas/.
CUSTOM_SCHEMAS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-inference.networking.k8s.io-v1.json",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway-gateway.networking.k8s.io-v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-gateway.networking.k8s.io-v1.json",
}
KUSTOMIZATION_SCHEMA = "kustomization-schemastore.json"
EPP_CONFIG_SCHEMA = "endpointpickerconfig-llm-d.ai-v1alpha1.json"
EPP_CONFIG_MAP, EPP_CONFIG_KEY = "multilora-epp-config", "epp-config.yaml"
MODEL_SERVER = "multilora"  # the Deployment running scripts/serve
SECRET_TEMPLATES = "secrets.example.yaml"  # Secrets that exist only as templates (not in kustomization.yaml)

# Env var names read by the AWS SDK (botocore), not by our code: credentials, AWS_DEFAULT_REGION (boto3's region),
# AWS_REGION (the other SDKs' region name, and the one in the issue), AWS_ENDPOINT_URL (botocore >= 1.31).
AWS_SDK_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL"}
CODE_DIRS = ("backends", "openai_frontend", "scripts", "model_repository")


# ---------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Doc:
    path: Path
    index: int
    body: dict

    @property
    def id(self) -> str:
        name = self.body.get("metadata", {}).get("name") if isinstance(self.body, dict) else None
        kind = self.body.get("kind", "Kustomization") if isinstance(self.body, dict) else "?"
        return f"{self.path.relative_to(DEPLOY)}#{self.index}:{kind}/{name or '-'}"


def load_docs() -> list[Doc]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for index, body in enumerate(yaml.safe_load_all(path.read_text())):
            if body is not None:
                docs.append(Doc(path, index, body))
    return docs


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


class Manifests:
    """The documents of deploy/, indexed; tests break deep copies of it."""

    def __init__(self, docs: list[Doc]):
        self.docs = docs

    def objects(self, kind: str | None = None) -> list[dict]:
        return [d.body for d in self.docs if d.path.name != "kustomization.yaml" and
                (kind is None or d.body.get("kind") == kind)]

    def get(self, kind: str, name: str) -> dict | None:
        return next((o for o in self.objects(kind) if o["metadata"]["name"] == name), None)

    def kustomizations(self) -> list[Doc]:
        return [d for d in self.docs if d.path.name == "kustomization.yaml"]

    def secret_template(self, name: str) -> dict | None:
        return next((d.body for d in self.docs if d.path.name == SECRET_TEMPLATES and d.body.get("kind") == "Secret"
                     and d.body["metadata"]["name"] == name), None)

    def epp_config(self) -> dict:
        return yaml.safe_load(self.get("ConfigMap", EPP_CONFIG_MAP)["data"][EPP_CONFIG_KEY])

    def pod_labels(self, deployment: str) -> dict:
        return self.get("Deployment", deployment)["spec"]["template"]["metadata"]["labels"]

    def container(self, deployment: str) -> dict:
        return self.get("Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def quantity_bytes(q: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?|k)?", str(q))
    assert m, f"not a quantity: {q!r}"
    return float(m[1]) * units.get(m[2] or "", 1)


# ---------------------------------------------------------------------------------------------------------------
# What the code really reads and serves


def env_names_read_by_code() -> set[str]:
    """Env names our code reads: string constants that are exactly an env name, plus scripts/serve's _env("X")."""
    names: set[str] = set()
    for folder in CODE_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                        re.fullmatch(r"(MULTILORA|VLLM)_[A-Z0-9_]+", node.value):
                    names.add(node.value)
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_env"
                        and node.args and isinstance(node.args[0], ast.Constant)):
                    names.add(f"MULTILORA_{node.args[0].value}")
    return names


def metric_names_emitted_by_code() -> dict[str, Path]:
    """Prometheus metric names our code registers (first argument of a Gauge/Counter/... call) -> the file."""
    found: dict[str, Path] = {}
    for folder in ("openai_frontend", "backends"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                        and isinstance(node.args[0].value, str) and node.args[0].value.startswith("vllm:")):
                    found[node.args[0].value] = path
    return found


_APP_ROUTES: dict | None = None


def app_routes() -> dict[str, dict]:
    """path -> {methods, endpoint, needs_key} of the frontend's FastAPI app, built without starting anything."""
    global _APP_ROUTES
    if _APP_ROUTES is None:
        import tempfile

        from openai_frontend import auth
        from openai_frontend.app import create_app
        from openai_frontend.config import FrontendConfig

        guards = {auth.require_api_key, auth.require_admin_key, auth.require_model_admin, auth.require_metrics_key}
        app = create_app(FrontendConfig(registry_file=Path(tempfile.mkdtemp()) / "registry.json", supervise=False,
                                        triton_metrics_url=None))

        def flat(routes):
            for r in routes:
                if hasattr(r, "effective_route_contexts"):  # FastAPI >= 0.16x wraps included routers
                    yield from r.effective_route_contexts()
                elif hasattr(r, "original_router"):
                    yield from flat(r.original_router.routes)
                elif getattr(r, "methods", None):
                    yield r

        def calls(dependant):
            for d in getattr(dependant, "dependencies", []):
                yield d.call
                yield from calls(d)

        _APP_ROUTES = {}
        for r in flat(app.routes):
            deps = set(calls(getattr(r, "dependant", None)))
            _APP_ROUTES[r.path] = {"methods": set(r.methods), "endpoint": r.endpoint, "needs_key": bool(guards & deps),
                                   "public_metrics_opens": auth.require_metrics_key in deps}
    return _APP_ROUTES


# ---------------------------------------------------------------------------------------------------------------
# Checks: each returns a list of problems


def check_selectors(m: Manifests) -> list[str]:
    problems = []
    deployments = m.objects("Deployment")
    for d in deployments:
        labels = d["spec"]["template"]["metadata"]["labels"]
        if not selects(d["spec"]["selector"]["matchLabels"], labels):
            problems.append(f"Deployment {d['metadata']['name']}: selector does not match its pod labels")
        for c in d["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
            if not selects(c["labelSelector"]["matchLabels"], labels):
                problems.append(f"Deployment {d['metadata']['name']}: topology spread selector misses its pods")
    for svc in m.objects("Service"):
        targets = [d for d in deployments
                   if selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        if not targets:
            problems.append(f"Service {svc['metadata']['name']}: selector matches no Deployment's pods")
            continue
        ports = {(p.get("name"), p["containerPort"]) for d in targets
                 for c in d["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            if not any(target in (name, number) for name, number in ports):
                problems.append(f"Service {svc['metadata']['name']}: targetPort {target} is no container port")
    return problems


def check_inference_chain(m: Manifests) -> list[str]:
    """HTTPRoute -> Gateway and InferencePool; InferencePool -> model-server pods and the EPP Service -> EPP pods."""
    problems = []
    pools = {p["metadata"]["name"]: p for p in m.objects("InferencePool")}
    gateways = {g["metadata"]["name"] for g in m.objects("Gateway")}
    for route in m.objects("HTTPRoute"):
        for parent in route["spec"]["parentRefs"]:
            if parent.get("kind", "Gateway") == "Gateway" and parent["name"] not in gateways:
                problems.append(f"HTTPRoute {route['metadata']['name']}: parent Gateway {parent['name']} "
                                "not in deploy/")
        for rule in route["spec"]["rules"]:
            for ref in rule.get("backendRefs", []):
                if ref.get("kind") != "InferencePool" or ref.get("group") != "inference.networking.k8s.io":
                    problems.append(f"HTTPRoute {route['metadata']['name']}: backendRef {ref} is not an InferencePool")
                elif ref["name"] not in pools:
                    problems.append(f"HTTPRoute {route['metadata']['name']}: no InferencePool {ref['name']}")
    if not pools:
        problems.append("no InferencePool")
    for name, pool in pools.items():
        selector = pool["spec"]["selector"]["matchLabels"]
        pods = [d for d in m.objects("Deployment") if selects(selector, d["spec"]["template"]["metadata"]["labels"])]
        if [d["metadata"]["name"] for d in pods] != [MODEL_SERVER]:
            problems.append(f"InferencePool {name}: selects {[d['metadata']['name'] for d in pods]}, "
                            f"not exactly [{MODEL_SERVER}]")
        container_ports = {p["containerPort"] for d in pods for c in d["spec"]["template"]["spec"]["containers"]
                           for p in c.get("ports", [])}
        for port in pool["spec"]["targetPorts"]:
            if port["number"] not in container_ports:
                problems.append(f"InferencePool {name}: target port {port['number']} is no container port")
        epp_ref = pool["spec"].get("endpointPickerRef")
        svc = m.get("Service", epp_ref["name"]) if epp_ref else None
        if svc is None:
            problems.append(f"InferencePool {name}: endpoint picker Service {epp_ref and epp_ref['name']} not found")
            continue
        if epp_ref["port"]["number"] not in {p["port"] for p in svc["spec"]["ports"]}:
            problems.append(f"InferencePool {name}: the picker Service has no port {epp_ref['port']['number']}")
        epps = [d for d in m.objects("Deployment") if selects(svc["spec"]["selector"],
                                                              d["spec"]["template"]["metadata"]["labels"])]
        if len(epps) != 1:
            problems.append(f"InferencePool {name}: the picker Service selects {len(epps)} Deployments")
            continue
        args = epps[0]["spec"]["template"]["spec"]["containers"][0]["args"]
        flags = dict(zip(args, args[1:]))
        if flags.get("--pool-name") != name:
            problems.append(f"the picker watches pool {flags.get('--pool-name')!r}, not {name!r}")
        if flags.get("--pool-group") != "inference.networking.k8s.io":
            problems.append(f"the picker's --pool-group is {flags.get('--pool-group')!r}")
        grpc = flags.get("--grpc-port", "9002")
        if int(grpc) != epp_ref["port"]["number"]:
            problems.append(f"the picker serves ext_proc on {grpc}, the pool calls {epp_ref['port']['number']}")
    return problems


def check_probes(m: Manifests) -> list[str]:
    """Probe paths are real GET routes of our app, reachable without a key; readiness is the models-ready route."""
    from openai_frontend.routers import health

    problems = []
    routes = app_routes()
    container = m.container(MODEL_SERVER)
    port_names = {p.get("name") for p in container["ports"]} | {p["containerPort"] for p in container["ports"]}
    expected = {"livenessProbe": health.health, "readinessProbe": health.ready, "startupProbe": health.health}
    for probe, endpoint in expected.items():
        get = container.get(probe, {}).get("httpGet")
        if get is None:
            problems.append(f"{probe}: missing or not httpGet")
            continue
        route = routes.get(get["path"])
        if route is None or "GET" not in route["methods"]:
            problems.append(f"{probe}: {get['path']} is not a GET route of openai_frontend")
        elif route["needs_key"]:
            problems.append(f"{probe}: {get['path']} wants an API key, which the kubelet does not send")
        elif route["endpoint"] is not endpoint:
            problems.append(f"{probe}: {get['path']} is {route['endpoint'].__name__}, not {endpoint.__name__}")
        if get["port"] not in port_names:
            problems.append(f"{probe}: port {get['port']} is not a container port")
    startup = container.get("startupProbe", {})
    if startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) < 600:
        problems.append("startupProbe allows less than the 600 s scripts/serve waits for the models to load")
    return problems


def _env_of(m: Manifests, deployment: str) -> tuple[dict[str, dict], dict[str, str]]:
    """(explicit env entries by name, ConfigMap values brought in by envFrom)."""
    container = m.container(deployment)
    explicit = {e["name"]: e for e in container.get("env", [])}
    from_maps: dict[str, str] = {}
    for source in container.get("envFrom", []):
        cm = m.get("ConfigMap", source.get("configMapRef", {}).get("name", ""))
        if cm is not None:
            from_maps.update(cm.get("data", {}))
    return explicit, from_maps


def check_env_names(m: Manifests) -> list[str]:
    """Every env name the model server gets is read by our code (or the AWS SDK)."""
    read = env_names_read_by_code()
    explicit, from_maps = _env_of(m, MODEL_SERVER)
    problems = []
    for name in sorted({*explicit, *from_maps}):
        if name in AWS_SDK_ENV or name in read:
            continue
        problems.append(f"env {name} is read nowhere in {', '.join(CODE_DIRS)}")
    return problems


def check_env_values(m: Manifests) -> list[str]:
    explicit, env = _env_of(m, MODEL_SERVER)
    problems = []
    level = env.get("MULTILORA_LOG_LEVEL")
    if level is not None and not isinstance(logging.getLevelName(level), int):
        problems.append(f"MULTILORA_LOG_LEVEL={level!r}: the backends pass it to logging as it is (upper case)")
    if env.get("MULTILORA_ALLOW_RUNTIME_LORA_UPDATING", "false").lower() not in ("1", "true", "yes", "on", "0",
                                                                                 "false", "no", "off"):
        problems.append("MULTILORA_ALLOW_RUNTIME_LORA_UPDATING is no boolean")
    deployment = m.get("Deployment", MODEL_SERVER)
    if deployment["spec"].get("replicas", 1) > 1 and not env.get("MULTILORA_LORA_REGISTRY", "").startswith("s3://"):
        problems.append("several replicas need the shared registry: MULTILORA_LORA_REGISTRY must be s3://...")
    # os.pathsep-separated like every path list of ours, the ':' of "s3://" excepted (backends.lora.store.downloads).
    for root in filter(None, re.split(r":(?!//)", env.get("MULTILORA_ALLOWED_LORA_ROOTS", ""))):
        if not root.startswith("s3://"):
            problems.append(f"allowed root {root!r} is not an s3:// prefix (pods share no adapter disk)")
    cache_dir = env.get("MULTILORA_S3_CACHE_DIR")
    spec = deployment["spec"]["template"]["spec"]
    mounts = {v["mountPath"]: v["name"] for v in spec["containers"][0].get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    volume = volumes.get(mounts.get(cache_dir, ""))
    if cache_dir is None or volume is None or "emptyDir" not in volume:
        problems.append(f"MULTILORA_S3_CACHE_DIR={cache_dir!r} is not the mount path of an emptyDir")
    else:
        limit = volume["emptyDir"].get("sizeLimit")
        cap = int(env.get("MULTILORA_S3_CACHE_MAX_BYTES", "0"))
        if limit is None or not 0 < cap < quantity_bytes(limit):
            problems.append(f"MULTILORA_S3_CACHE_MAX_BYTES={cap} must be set and below the cache volume's "
                            f"sizeLimit {limit}")
    return problems


def check_references(m: Manifests) -> list[str]:
    """ConfigMaps and Secrets that pods reference exist in deploy/, with the keys they name (unless optional)."""
    problems = []
    for d in m.objects("Deployment"):
        spec = d["spec"]["template"]["spec"]
        where = f"Deployment {d['metadata']['name']}"
        for c in spec["containers"]:
            for source in c.get("envFrom", []):
                if "configMapRef" in source and m.get("ConfigMap", source["configMapRef"]["name"]) is None:
                    problems.append(f"{where}: envFrom ConfigMap {source['configMapRef']['name']} not in deploy/")
                if "secretRef" in source and m.secret_template(source["secretRef"]["name"]) is None:
                    problems.append(f"{where}: envFrom Secret {source['secretRef']['name']} not in deploy/")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if key not in ref:
                        continue
                    r = ref[key]
                    obj = m.get(kind, r["name"]) if kind == "ConfigMap" else m.secret_template(r["name"])
                    if obj is None:
                        problems.append(f"{where}: env {e['name']} refers to missing {kind} {r['name']}")
                    elif not r.get("optional") and r["key"] not in {**obj.get("data", {}), **obj.get("stringData", {})}:
                        problems.append(f"{where}: env {e['name']}: {kind} {r['name']} has no key {r['key']}")
        for v in spec.get("volumes", []):
            if "configMap" in v and m.get("ConfigMap", v["configMap"]["name"]) is None:
                problems.append(f"{where}: volume {v['name']}: ConfigMap {v['configMap']['name']} not in deploy/")
        if d["spec"]["template"]["spec"].get("serviceAccountName") and \
                m.get("ServiceAccount", spec["serviceAccountName"]) is None:
            problems.append(f"{where}: ServiceAccount {spec['serviceAccountName']} not in deploy/")
    for binding in m.objects("RoleBinding"):
        if m.get("Role", binding["roleRef"]["name"]) is None:
            problems.append(f"RoleBinding {binding['metadata']['name']}: no Role {binding['roleRef']['name']}")
        for s in binding["subjects"]:
            if s["kind"] == "ServiceAccount" and m.get("ServiceAccount", s["name"]) is None:
                problems.append(f"RoleBinding {binding['metadata']['name']}: no ServiceAccount {s['name']}")
    # The picker's --config-file is a key of the ConfigMap mounted at its folder.
    epp = m.container("multilora-epp")
    args = dict(zip(epp["args"], epp["args"][1:]))
    config_file = Path(args.get("--config-file", ""))
    mounts = {vm["mountPath"]: vm["name"] for vm in epp.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in m.get("Deployment", "multilora-epp")["spec"]["template"]["spec"]["volumes"]}
    volume = volumes.get(mounts.get(str(config_file.parent), ""), {})
    cm = m.get("ConfigMap", volume.get("configMap", {}).get("name", ""))
    if cm is None or config_file.name not in cm.get("data", {}):
        problems.append(f"the picker's --config-file {config_file} is no key of a ConfigMap mounted there")
    return problems


def check_metrics_reachable(m: Manifests) -> list[str]:
    """The picker scrapes our /metrics without credentials: /metrics must be public (MULTILORA_PUBLIC_METRICS) or
    the API key that would guard it must stay unset."""
    problems = []
    config = m.epp_config()
    sources = [p for p in config["plugins"] if p["type"] == "metrics-data-source"]
    for source in sources:
        params = source.get("parameters", {})
        path = params.get("path", "/metrics")
        route = app_routes().get(path)
        if route is None or "GET" not in route["methods"]:
            problems.append(f"the picker scrapes {path}, which is not a GET route of openai_frontend")
        if params.get("scheme", "http") != "http":
            problems.append("the frontend serves plain HTTP: the picker must scrape http")
        explicit, from_maps = _env_of(m, MODEL_SERVER)
        public = from_maps.get("MULTILORA_PUBLIC_METRICS", "").strip().lower() in ("1", "true", "yes", "on")
        if route is not None and route["needs_key"] and not (route["public_metrics_opens"] and public):
            if "MULTILORA_API_KEY" in from_maps:
                problems.append("MULTILORA_API_KEY in the ConfigMap: /metrics would refuse the picker")
            entry = explicit.get("MULTILORA_API_KEY")
            ref = (entry or {}).get("valueFrom", {}).get("secretKeyRef")
            if entry is not None and ref is None:
                problems.append("MULTILORA_API_KEY set literally: /metrics would refuse the picker")
            if ref is not None:
                secret = m.secret_template(ref["name"]) or {}
                if not ref.get("optional") or ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}:
                    problems.append("MULTILORA_API_KEY is set by default: /metrics would refuse the picker "
                                    "(keep the secretKeyRef optional and the key out of the template)")
    if not sources:
        problems.append("the picker config has no metrics-data-source")
    return problems


def check_epp_config(m: Manifests) -> list[str]:
    """The picker's config: plugin references resolve, the required scorers score, metric names are ours."""
    problems = []
    config = m.epp_config()
    plugins = {p.get("name") or p["type"]: p for p in config["plugins"]}
    refs = [r["pluginRef"] for prof in config["schedulingProfiles"] for r in prof["plugins"]]
    for source in config.get("dataLayer", {}).get("sources", []):
        refs += [source["pluginRef"], *(e["pluginRef"] for e in source["extractors"])]
    refs += [p["pluginRef"] for p in config.get("requestHandler", {}).get("parsers", [])]
    for ref in refs:
        if ref not in plugins:
            problems.append(f"EPP config: pluginRef {ref!r} names no plugin")
    weights = {r["pluginRef"]: r.get("weight", 1) for prof in config["schedulingProfiles"] for r in prof["plugins"]}
    for scorer in ("queue-scorer", "kv-cache-utilization-scorer", "lora-affinity-scorer"):
        used = [n for n, p in plugins.items() if p["type"] == scorer and weights.get(n, 0) > 0]
        if not used:
            problems.append(f"EPP config: no {scorer} with a positive weight in a scheduling profile")
    emitted = metric_names_emitted_by_code()
    pod_labels = m.pod_labels(MODEL_SERVER)
    for extractor in (p for p in config["plugins"] if p["type"] == "core-metrics-extractor"):
        params = extractor.get("parameters", {})
        engine = pod_labels.get(params.get("engineLabelKey", "llm-d.ai/engine-type"),
                                params.get("defaultEngine", "vllm"))
        configs = {e["name"]: e for e in params.get("engineConfigs", [])}
        if engine not in configs:
            problems.append(f"EPP config: our pods' engine {engine!r} has no engineConfigs entry naming our metrics")
            continue
        for field in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec"):
            family = re.sub(r"\{.*\}$", "", configs[engine].get(field, "")).strip()
            if not family:
                problems.append(f"EPP config: {field} is off, its scorer would see nothing")
            elif family not in emitted:
                problems.append(f"EPP config: {field} = {family!r}, which our /metrics does not emit")
        lora = re.sub(r"\{.*\}$", "", configs[engine].get("loraSpec", ""))
        if lora in emitted:
            text = emitted[lora].read_text()
            for label in ("max_lora", "running_lora_adapters", "waiting_lora_adapters"):
                if f'"{label}"' not in text:
                    problems.append(f"{lora} in {emitted[lora].name} lacks the label {label}")
    return problems


def apply_json6902(doc: dict, ops: list[dict]) -> dict:
    """The subset of RFC 6902 kustomize patches here use: test, add, replace, remove."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key = int(last) if isinstance(node, list) and last != "-" else last
        if op["op"] == "test":
            if node[key] != op["value"]:
                raise ValueError(f"test failed at {op['path']}: {node[key]!r} != {op['value']!r}")
        elif op["op"] == "add":
            if isinstance(node, list):
                node.append(op["value"]) if key == "-" else node.insert(key, op["value"])
            else:
                node[key] = op["value"]
        elif op["op"] == "replace":
            node[key]  # must exist
            node[key] = op["value"]
        elif op["op"] == "remove":
            del node[key]
        else:
            raise ValueError(f"unsupported op {op['op']}")
    return doc


def render_overlay(m: Manifests, kustomization: Doc) -> list[dict]:
    """Deployments of a kustomization whose resources include the base, with its images and patches applied."""
    k = kustomization.body
    rendered = []
    for d in m.objects("Deployment"):
        d = copy.deepcopy(d)
        for patch in k.get("patches", []):
            target = patch.get("target", {})
            if target.get("kind") == "Deployment" and target.get("name") == d["metadata"]["name"]:
                d = apply_json6902(d, yaml.safe_load(patch["patch"]))
        for image in k.get("images", []):
            for c in d["spec"]["template"]["spec"]["containers"]:
                if c["image"].split(":")[0] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image.get('newTag', 'latest')}"
        rendered.append(d)
    return rendered


def check_kustomizations(m: Manifests) -> list[str]:
    problems = []
    images = {c["image"].split(":")[0] for d in m.objects("Deployment")
              for c in d["spec"]["template"]["spec"]["containers"]}
    for k in m.kustomizations():
        folder = k.path.parent
        listed = set()
        for resource in k.body.get("resources", []):
            target = (folder / resource).resolve()
            listed.add(target)
            if not (target.is_file() or (target / "kustomization.yaml").is_file()):
                problems.append(f"{k.id}: resource {resource} does not exist")
        loose = {p for p in folder.glob("*.yaml")} - listed - {k.path, DEPLOY / SECRET_TEMPLATES}
        if loose:
            problems.append(f"{k.id}: does not list {sorted(p.name for p in loose)}")
        for image in k.body.get("images", []):
            if image["name"] not in images:
                problems.append(f"{k.id}: image {image['name']} is used by no container")
        if k.body.get("patches") or k.body.get("images"):  # an overlay: of the base, rendered and validated
            if BASE not in listed:
                problems.append(f"{k.id}: an overlay must list the base ({BASE}) in its resources")
            try:
                for d in render_overlay(m, k):
                    kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            except (ValueError, KeyError, IndexError, kubernetes_validate.ValidationError) as exc:
                problems.append(f"{k.id}: the rendered overlay is invalid: {exc}")
    if not any(k.path.parent == BASE for k in m.kustomizations()):
        problems.append("no deploy/base/kustomization.yaml")
    return problems


def check_gpu_overlay(m: Manifests) -> list[str]:
    gpu = next((k for k in m.kustomizations() if k.path.parent.name == "gpu"), None)
    if gpu is None:
        return ["no deploy/gpu/kustomization.yaml"]
    try:
        model_server = next(d for d in render_overlay(m, gpu) if d["metadata"]["name"] == MODEL_SERVER)
    except (ValueError, KeyError, IndexError) as exc:
        return [f"the GPU overlay does not apply: {exc}"]
    resources = model_server["spec"]["template"]["spec"]["containers"][0]["resources"]
    problems = []
    if str(resources.get("limits", {}).get("nvidia.com/gpu")) != "1":
        problems.append("the GPU overlay does not give the model server nvidia.com/gpu: 1")
    if "nvidia.com/gpu" in m.container(MODEL_SERVER)["resources"].get("limits", {}):
        problems.append("the base asks for a GPU: it is the CPU deployment")
    return problems


CHECKS = [check_selectors, check_inference_chain, check_probes, check_env_names, check_env_values, check_references,
          check_metrics_reachable, check_epp_config, check_kustomizations, check_gpu_overlay]


# ---------------------------------------------------------------------------------------------------------------
# Tests

DOCS = load_docs()


def validate_doc(doc: Doc) -> None:
    body = doc.body
    if doc.path.name == "kustomization.yaml":
        s = schema(KUSTOMIZATION_SCHEMA)
        jsonschema.validators.validator_for(s)(s).validate(body)
        return
    key = (body.get("apiVersion"), body.get("kind"))
    if key in CUSTOM_SCHEMAS:
        jsonschema.Draft202012Validator(schema(CUSTOM_SCHEMAS[key])).validate(body)
    else:
        kubernetes_validate.validate(body, K8S_VERSION, strict=True)  # SchemaNotFoundError for an unknown kind


@pytest.mark.parametrize("doc", DOCS, ids=[d.id for d in DOCS])
def test_document_validates(doc):
    validate_doc(doc)


def test_every_yaml_is_covered():
    kinds = {(d.body.get("apiVersion"), d.body.get("kind")) for d in DOCS if d.path.name != "kustomization.yaml"}
    assert {("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"), ("v1", "Secret"),
            *CUSTOM_SCHEMAS} <= kinds
    assert {d.path for d in DOCS} == set(DEPLOY.rglob("*.yaml"))  # no empty or unparsed file
    assert not list(DEPLOY.rglob("*.yml"))


def test_epp_config_validates():
    config = Manifests(DOCS).epp_config()
    jsonschema.Draft202012Validator(schema(EPP_CONFIG_SCHEMA)).validate(config)


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_cross_references(check):
    assert check(Manifests(copy.deepcopy(DOCS))) == []


# One way to break the manifests per check, applied to a copy: the check must report it.
def _set(kind, name, path, value):
    def mutate(m: Manifests):
        node = m.get(kind, name)
        *parents, last = path
        for p in parents:
            node = node[p]
        node[last] = value
    return mutate


def _env(name, value):
    def mutate(m: Manifests):
        m.get("ConfigMap", "multilora-config")["data"][name] = value
    return mutate


def _epp(edit):
    def mutate(m: Manifests):
        cm = m.get("ConfigMap", EPP_CONFIG_MAP)
        config = yaml.safe_load(cm["data"][EPP_CONFIG_KEY])
        edit(config)
        cm["data"][EPP_CONFIG_KEY] = yaml.safe_dump(config)
    return mutate


def _extractor(config):
    return next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")["parameters"]["engineConfigs"][0]


def _gpu_patch(edit):
    def mutate(m: Manifests):
        gpu = next(k for k in m.kustomizations() if k.path.parent.name == "gpu")
        ops = yaml.safe_load(gpu.body["patches"][0]["patch"])
        edit(ops)
        gpu.body["patches"][0]["patch"] = yaml.safe_dump(ops)
    return mutate


def _api_key_without_public_metrics(m: Manifests):
    m.get("ConfigMap", "multilora-config")["data"].pop("MULTILORA_PUBLIC_METRICS")
    m.secret_template("multilora-keys")["stringData"]["api-key"] = "set"


MUTATIONS = {
    "service-selector": (check_selectors, _set("Service", "multilora", ["spec", "selector"],
                                               {"app.kubernetes.io/name": "typo"})),
    "service-target-port": (check_selectors, lambda m: m.get("Service", "multilora")["spec"]["ports"][0]
                            .__setitem__("targetPort", "metrics")),
    "pool-selector": (check_inference_chain, _set("InferencePool", "multilora", ["spec", "selector", "matchLabels"],
                                                  {"app.kubernetes.io/name": "multilora-epp"})),
    "pool-port": (check_inference_chain, _set("InferencePool", "multilora", ["spec", "targetPorts"],
                                              [{"number": 8000}])),
    "route-backend": (check_inference_chain, lambda m: m.get("HTTPRoute", "multilora")["spec"]["rules"][0]
                      ["backendRefs"][0].__setitem__("name", "vllm")),
    "epp-pool-name": (check_inference_chain, lambda m: m.container("multilora-epp")["args"]
                      .__setitem__(1, "other-pool")),
    "readiness-path": (check_probes, lambda m: m.container(MODEL_SERVER)["readinessProbe"]["httpGet"]
                       .__setitem__("path", "/ready")),
    "readiness-is-liveness": (check_probes, lambda m: m.container(MODEL_SERVER)["readinessProbe"]["httpGet"]
                              .__setitem__("path", "/health")),
    "probe-needs-key": (check_probes, lambda m: m.container(MODEL_SERVER)["livenessProbe"]["httpGet"]
                        .__setitem__("path", "/metrics")),
    "env-unknown": (check_env_names, _env("MULTILORA_MAX_LORAS", "8")),
    "env-log-level": (check_env_values, _env("MULTILORA_LOG_LEVEL", "info")),
    "env-local-registry": (check_env_values, _env("MULTILORA_LORA_REGISTRY", "/data/registry.json")),
    "env-cache-cap": (check_env_values, _env("MULTILORA_S3_CACHE_MAX_BYTES", str(64 << 30))),
    "env-cache-dir": (check_env_values, _env("MULTILORA_S3_CACHE_DIR", "/tmp/s3")),
    "env-local-root": (check_env_values, _env("MULTILORA_ALLOWED_LORA_ROOTS", "s3://multilora-adapters/a:/adapters")),
    "secret-key": (check_references, lambda m: m.container(MODEL_SERVER)["env"][0]["valueFrom"]["secretKeyRef"]
                   .__setitem__("key", "admin")),
    "configmap-ref": (check_references, lambda m: m.container(MODEL_SERVER)["envFrom"][0]["configMapRef"]
                      .__setitem__("name", "multilora")),
    "epp-config-file": (check_references, lambda m: m.container("multilora-epp")["args"]
                        .__setitem__(m.container("multilora-epp")["args"].index("--config-file") + 1,
                                     "/config/plugins.yaml")),
    "api-key-blinds-epp": (check_metrics_reachable, _api_key_without_public_metrics),
    "epp-scrape-path": (check_metrics_reachable, _epp(lambda c: c["plugins"][0]["parameters"]
                                                      .__setitem__("path", "/v1/metrics"))),
    "epp-metric-name": (check_epp_config, _epp(lambda c: _extractor(c).__setitem__("queuedRequestsSpec",
                                                                                     "vllm:num_requests_queued"))),
    "epp-lora-off": (check_epp_config, _epp(lambda c: _extractor(c).__setitem__("loraSpec", ""))),
    "epp-plugin-ref": (check_epp_config, _epp(lambda c: c["schedulingProfiles"][0]["plugins"][2]
                                              .__setitem__("pluginRef", "lora-affinity"))),
    "epp-scorer-missing": (check_epp_config, _epp(lambda c: c["schedulingProfiles"][0]["plugins"].pop(1))),
    "kustomize-missing": (check_kustomizations, lambda m: next(k for k in m.kustomizations() if k.path.parent == BASE)
                          .body["resources"].pop()),
    "overlay-no-base": (check_kustomizations, lambda m: next(k for k in m.kustomizations()
                                                             if k.path.parent.name == "gpu")
                        .body.__setitem__("resources", ["../base/epp.yaml"])),
    "gpu-patch-position": (check_kustomizations,
                           _gpu_patch(lambda ops: ops[1].__setitem__("value", "s3-adapter-cache"))),
    "gpu-no-gpu": (check_gpu_overlay, _gpu_patch(lambda ops: ops[3].__setitem__("value", 0))),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_check_catches(name):
    check, mutate = MUTATIONS[name]
    m = Manifests(copy.deepcopy(DOCS))
    assert check(m) == [], "the unbroken manifests must pass first"
    mutate(m)
    assert check(m), f"{check.__name__} did not notice {name}"


@pytest.mark.parametrize("name,mutate", [
    ("unknown-field", lambda b: b["spec"]["template"]["spec"]["containers"][0].__setitem__("livenessprobe", {})),
    ("pool-v1alpha2-field", lambda b: b["spec"].__setitem__("extensionRef", {"name": "epp"})),
    ("route-kind", lambda b: b.__setitem__("apiVersion", "gateway.networking.k8s.io/v2")),
    ("epp-config-field", None),
])
def test_schema_catches(name, mutate):
    """The schema step itself rejects what kubectl or the picker would."""
    if name == "epp-config-field":
        config = Manifests(DOCS).epp_config()
        config["plugins"][0]["parameters"]["metricsPath"] = "/metrics"  # the EPP decodes parameters strictly
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft202012Validator(schema(EPP_CONFIG_SCHEMA)).validate(config)
        return
    target = {"unknown-field": ("Deployment", MODEL_SERVER), "pool-v1alpha2-field": ("InferencePool", "multilora"),
              "route-kind": ("HTTPRoute", "multilora")}[name]
    doc = next(d for d in DOCS if d.body.get("kind") == target[0] and d.body["metadata"]["name"] == target[1])
    broken = Doc(doc.path, doc.index, copy.deepcopy(doc.body))
    mutate(broken.body)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.SchemaNotFoundError)):
        validate_doc(broken)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its kustomize) is not installed")
@pytest.mark.parametrize("root", ["", "gpu"], ids=["cpu", "gpu-overlay"])  # not "gpu": conftest skips that keyword
def test_kustomize_renders(root):
    """Where kubectl is at hand: kustomize itself renders deploy/ and deploy/gpu/, and every object validates."""
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / root)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [b for b in yaml.safe_load_all(out.stdout) if b]
    assert len(rendered) == len(Manifests(DOCS).objects()) - len(Manifests(DOCS).objects("Secret"))
    for body in rendered:
        validate_doc(Doc(DEPLOY / root / "rendered.yaml", 0, body))
    if root == "gpu":
        server = next(b for b in rendered if b["kind"] == "Deployment" and b["metadata"]["name"] == MODEL_SERVER)
        assert server["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
