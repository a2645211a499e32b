"""The packaging files, checked without installing: the Helm chart renders to valid manifests, the
systemd unit verifies and is hardened, the Dockerfile calls install.sh as it exists, and the
bundle asks pip for the right torch.

No helm binary is packaged for Debian or PyPI here, so the chart is rendered by `_render` below: a
small interpreter for the Go-template subset the chart uses (fields, `$vars`, `if/else/end`,
`range $k, $v := map`, `quote`, `toYaml`, `nindent`, `{{-`/`-}}` trimming), failing on anything
else. Where `helm` is on PATH, `helm lint` and `helm template` run as well.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from hearth.appliance.tools import bundle

INSTALLERS = Path(__file__).resolve().parents[1] / "installers"
CHART = INSTALLERS / "helm" / "hearth"
_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


# ---- a Go-template subset ----


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for match in _ACTION.finditer(text):
        chunk = text[pos : match.start()]
        chunk = chunk.lstrip() if trim_next else chunk
        out.append(("text", chunk.rstrip() if match.group(1) else chunk))
        out.append(("action", match.group(2)))
        pos, trim_next = match.end(), bool(match.group(3))
    tail = text[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


def _go_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        raise KeyError("a template printed a missing value")
    return str(value)


def _term(term: str, scope: dict[str, Any]) -> Any:
    if term.startswith('"'):
        return json.loads(term)
    if re.fullmatch(r"-?\d+", term):
        return int(term)
    head, *fields = term.split(".")
    value = scope[head] if head else scope  # `.Values.x`: nothing before the first dot
    for name in fields:
        value = value[name]  # KeyError on a typo in a template
    return value


def _eval(expr: str, scope: dict[str, Any]) -> Any:
    """`term`, `fn term` or `fn args term`, then `| fn args` pipes (the value goes last)."""
    first, *pipes = [part.strip() for part in expr.split("|")]
    *call, term = first.split()
    value = _term(term, scope)
    for pipe in ([" ".join(call)] if call else []) + pipes:
        name, *args = pipe.split()
        value = _function(name, args, value)
    return value


def _function(name: str, args: list[str], value: Any) -> Any:
    if name == "quote":
        return json.dumps(_go_str(value))
    if name == "toYaml":
        return yaml.safe_dump(value, default_flow_style=False).rstrip("\n")
    if name == "nindent":
        pad = " " * int(args[0])
        return "\n" + "\n".join(pad + line for line in str(value).splitlines())
    raise ValueError(f"template function {name!r} is outside the tested subset")


def _render_tokens(tokens: list[tuple[str, str]], i: int, scope: dict, out: list[str]) -> int:
    """Render from tokens[i] to the matching end/else; return the index of that token."""
    while i < len(tokens):
        kind, body = tokens[i]
        if kind == "text":
            out.append(body)
        elif body in ("end", "else"):
            return i
        elif body.startswith("if "):
            i = _render_if(tokens, i, scope, out)
        elif body.startswith("range "):
            i = _render_range(tokens, i, scope, out)
        else:
            out.append(_go_str(_eval(body, scope)))
        i += 1
    return i


def _render_if(tokens, i, scope, out) -> int:
    taken = bool(_eval(tokens[i][1][3:], scope))
    then: list[str] = []
    j = _render_tokens(tokens, i + 1, scope, then)
    other: list[str] = []
    if tokens[j][1] == "else":
        j = _render_tokens(tokens, j + 1, scope, other)
    out.extend(then if taken else other)
    return j


def _render_range(tokens, i, scope, out) -> int:
    match = re.fullmatch(r"range \$(\w+), \$(\w+) := (.+)", tokens[i][1])
    assert match, f"unsupported range: {tokens[i][1]}"
    mapping = _eval(match.group(3), scope)
    end = _matching_end(tokens, i)
    for key in sorted(mapping):  # Go ranges over maps in key order
        inner = {**scope, f"${match.group(1)}": key, f"${match.group(2)}": mapping[key]}
        _render_tokens(tokens, i + 1, inner, out)
    return end


def _matching_end(tokens, i) -> int:
    depth = 0
    for j in range(i + 1, len(tokens)):
        kind, body = tokens[j]
        if kind == "action" and body.startswith(("if ", "range ")):
            depth += 1
        elif kind == "action" and body == "end":
            if depth == 0:
                return j
            depth -= 1
    raise ValueError("range without end")


def _render(template: str, values: dict) -> str:
    scope = {
        "Values": values,
        "Release": {"Name": "edge", "Namespace": "default"},
        "Chart": yaml.safe_load((CHART / "Chart.yaml").read_text()),
    }
    scope["Chart"] = {k[0].upper() + k[1:]: v for k, v in scope["Chart"].items()}
    out: list[str] = []
    _render_tokens(_tokens(template), 0, scope, out)
    return "".join(out)


def _manifests(overrides: dict | None = None) -> dict[str, dict]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path, value in (overrides or {}).items():
        *parents, leaf = path.split(".")
        node = values
        for name in parents:
            node = node[name]
        node[leaf] = value
    docs = {}
    for template in sorted((CHART / "templates").glob("*.yaml")):
        for doc in yaml.safe_load_all(_render(template.read_text(), values)):
            if doc is not None:
                assert {"apiVersion", "kind", "metadata"} <= set(doc), template.name
                docs[doc["kind"]] = doc
    return docs


# ---- the chart ----


def test_chart_renders_deployment_service_pvc():
    docs = _manifests()
    assert set(docs) == {"Deployment", "Service", "PersistentVolumeClaim"}
    deployment, service, pvc = docs["Deployment"], docs["Service"], docs["PersistentVolumeClaim"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == "registry.local/hearth:0.1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HEARTH_HOST"] == "0.0.0.0" and env["HEARTH_PORT"] == "8000"
    annotations = pod["metadata"]["annotations"]
    assert (
        annotations["prometheus.io/scrape"] == "true"
        and annotations["prometheus.io/port"] == "8000"
    )
    assert annotations["prometheus.io/path"] == "/metrics"
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert pod["metadata"]["labels"] == service["spec"]["selector"]
    assert service["spec"]["ports"][0] == {"name": "http", "port": 8000, "targetPort": "http"}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    seed = pod["spec"]["initContainers"][0]
    assert seed["image"] == container["image"] and "/var/lib/hearth/." in seed["command"][-1]
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the Dockerfile's uid
    assert "nodeSelector" not in pod["spec"]


def test_chart_hpa_scales_on_waiting_requests_and_options_switch():
    docs = _manifests({"autoscaling.enabled": True, "persistence.enabled": False,
                       "nodeSelector": {"gpu": "h100"}})
    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]
    assert metric["metric"]["name"] == "vllm_num_requests_waiting"
    assert metric["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert "PersistentVolumeClaim" not in docs
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["state"] == {"name": "state", "emptyDir": {}}
    assert pod["nodeSelector"] == {"gpu": "h100"}


def test_chart_gpu_count_sets_resources_and_parallelism():
    container = _manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HEARTH_DATA_PARALLEL_SIZE"] == "1" and "HEARTH_TENSOR_PARALLEL_SIZE" not in env
    docs = _manifests({"gpu.count": 2, "gpu.tensorParallel": True})
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 2
    assert resources["requests"]["cpu"] == "2" and resources["limits"]["memory"] == "16Gi"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HEARTH_TENSOR_PARALLEL_SIZE"] == "2" and "HEARTH_DATA_PARALLEL_SIZE" not in env


def test_the_renderer_rejects_what_it_does_not_know():
    with pytest.raises(ValueError, match="outside the tested subset"):
        _render("{{ .Values.x | upper }}", {"x": "a"})
    with pytest.raises(KeyError):
        _render("{{ .Values.typo }}", {"x": "a"})
    assert _render("a\n  {{- if .Values.x }} yes{{ else }} no{{ end }}", {"x": False}) == "a no"


@pytest.mark.skipif(shutil.which("helm") is None, reason="no helm binary on this machine")
def test_helm_lint_and_template():
    subprocess.run(["helm", "lint", str(CHART)], check=True)
    rendered = subprocess.run(["helm", "template", "edge", str(CHART)], check=True,
                              capture_output=True, text=True).stdout
    kinds = {doc["kind"] for doc in yaml.safe_load_all(rendered) if doc}
    assert kinds == {"Deployment", "Service", "PersistentVolumeClaim"}


# ---- the systemd unit, the Dockerfile, install.sh, the bundle's requirements ----


def _unit_directives() -> dict[str, str]:
    lines = (INSTALLERS / "hearth.service").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def test_unit_is_hardened_and_restarts_on_failure():
    unit = _unit_directives()
    assert unit["User"] == "hearth" and unit["NoNewPrivileges"] == "yes"
    assert unit["ProtectSystem"] == "strict" and unit["ReadWritePaths"] == "/var/lib/hearth"
    assert unit["Restart"] == "on-failure" and unit["EnvironmentFile"] == "/etc/hearth/hearth.env"
    assert unit["ExecStart"] == "/opt/hearth/venv/bin/hearth serve"
    assert unit["CapabilityBoundingSet"] == "" and unit["ProtectHome"] == "yes"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_verifies_and_has_a_low_exposure(tmp_path):
    fake = tmp_path / "opt/hearth/venv/bin/hearth"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    unit = tmp_path / "hearth.service"
    unit.write_text(
        (INSTALLERS / "hearth.service")
        .read_text()
        .replace("/opt/hearth", str(tmp_path / "opt/hearth"))
    )
    subprocess.run(["systemd-analyze", "verify", str(unit)], check=True, timeout=60)
    report = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                            capture_output=True, text=True, timeout=60).stdout
    level = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", report).group(1))
    assert level <= 4.0, report


def test_dockerfile_installs_the_bundle_offline_as_an_unprivileged_user():
    text = (INSTALLERS / "Dockerfile").read_text()
    assert "install.sh --no-systemd --host 0.0.0.0" in text
    assert "--uid 10001" in text and "USER 10001" in text
    assert 'ENTRYPOINT ["/opt/hearth/bin/hearth-serve"]' in text
    options = re.findall(r"^\s+(--[a-z-]+)\)", (INSTALLERS / "install.sh").read_text(), re.M)
    assert {"--no-systemd", "--host", "--prefix", "--port", "--python"} <= set(options)


def test_install_sh_installs_at_the_bundled_locks_versions():
    lines = re.sub(r"\\\n\s*", "", (INSTALLERS / "install.sh").read_text()).splitlines()
    [install] = [line for line in lines if '-r "$BUNDLE/requirements.txt"' in line]
    assert "--no-index" in install and f'-c "$BUNDLE/{bundle.LOCK_IN_BUNDLE}"' in install


def test_install_scripts_parse():
    for script in ("install.sh", "uninstall.sh"):
        subprocess.run(["bash", "-n", str(INSTALLERS / script)], check=True)
    result = subprocess.run(["bash", str(INSTALLERS / "install.sh"), "--bogus"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "unknown option --bogus" in result.stderr


def _options(**changes: Any) -> bundle.BundleOptions:
    base = {"out": Path("b.tar"), "models": (), "torch": "cpu", "python_version": "3.11",
            "platforms": tuple(bundle.default_platforms("x86_64"))}
    return bundle.BundleOptions(**{**base, **changes})


def test_bundle_requirements_pin_torch_per_target():
    assert bundle.requirements(_options()) == ["hearth[serve]==0.1.0", "torch==2.13.0+cpu"]
    assert bundle.requirements(_options(torch="cuda", ui=True)) == [
        "hearth[serve,ui]==0.1.0", "torch==2.13.0"
    ]
    assert bundle.default_platforms("aarch64")[0] == "manylinux_2_31_aarch64"


def test_install_sh_tls_options(tmp_path):
    text = (INSTALLERS / "install.sh").read_text()
    options = set(re.findall(r"^\s+(--[a-z-]+)\)", text, re.M))
    assert {"--tls", "--tls-name", "--tls-cert", "--tls-key"} <= options
    assert '"$OPT/venv/bin/hearth" cert --out-dir "$ETC/tls"' in text
    assert "HEARTH_SSL_CERTFILE=" in text and "HEARTH_STATE_DIR=$STATE" in text
    for args, message in ((["--tls-cert", "c.pem"], "--tls-cert needs --tls-key"),
                          (["--tls-key", "k.pem"], "--tls-key needs --tls-cert")):
        result = subprocess.run(["bash", str(INSTALLERS / "install.sh"), *args],
                                capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 1 and message in result.stderr
    unit = (INSTALLERS / "hearth.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit  # systemctl reload: the keys file
