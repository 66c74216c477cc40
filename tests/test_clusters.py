"""Cluster files and the configs that target them.

* Every file under ``clusters/`` validates against Ray's own cluster schema: launcher files through
  ``prepare_config`` + ``validate_config``, the KubeRay manifest through the autoscaler's own translation of
  a RayCluster into node types (which ends in ``validate_config``), plus the manifest's expected structure.
* Placement lines up: every ``configs/cluster-*.yaml`` requests custom resources and labels that the teacher
  and student node types of every cluster file declare, and the teacher type keeps enough nodes up.
* The shell commands the launcher runs on the nodes do what the comments say: they are executed here with
  stub ``ray``, ``hostname``, ``nvidia-smi`` programs that record what they were called with.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shlex
import subprocess
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from raydistill.cli import main as cli_main
from raydistill.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted((REPO / "clusters").glob("*.yaml"))
LAUNCHER_FILES = [p for p in CLUSTER_FILES if p.name != "kuberay.yaml"]
CLUSTER_CONFIGS = sorted((REPO / "configs").glob("cluster-*.yaml"))
RAY_MINOR = ".".join(ray.__version__.split(".")[:2])
ROLE = "raydistill/role"


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _ray_cluster(path: Path = REPO / "clusters" / "kuberay.yaml") -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    clusters = [d for d in docs if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1, f"{path}: expected exactly one RayCluster, found {len(clusters)}"
    cr = copy.deepcopy(clusters[0])
    # The manifest leaves the namespace to kubectl; the autoscaler's translation needs one.
    cr["metadata"].setdefault("namespace", "default")
    return cr


def _node_types(path: Path) -> dict[str, dict[str, Any]]:
    """Node types as the autoscaler sees them (launcher file, or KubeRay's translation of the manifest)."""
    if path.name == "kuberay.yaml":
        return _derive_autoscaling_config_from_ray_cr(_ray_cluster(path))["available_node_types"]
    return prepare_config(_load(path))["available_node_types"]


def _type_with_role(types: dict[str, dict[str, Any]], role: str) -> dict[str, Any]:
    found = [t for t in types.values() if t.get("labels", {}).get(ROLE) == role]
    assert len(found) == 1, f"expected one node type labelled {ROLE}={role}, found {len(found)}"
    return found[0]


# ------------------------------------------------------------------------------------------ schema
def test_every_cluster_file_is_covered() -> None:
    assert {p.name for p in CLUSTER_FILES} == {"aws.yaml", "kuberay.yaml", "local.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_files_validate_against_rays_schema(path: Path) -> None:
    config = prepare_config(_load(path))
    validate_config(config)
    assert config["cluster_name"].startswith("raydistill")


def test_kuberay_manifest_translates_into_a_valid_autoscaling_config() -> None:
    config = _derive_autoscaling_config_from_ray_cr(_ray_cluster())  # calls validate_config itself
    validate_config(config)
    assert set(config["available_node_types"]) == {"headgroup", "teacher", "student"}


def test_schema_rejects_what_ray_rejects() -> None:
    """The validation above is not vacuous: fractional resources and unknown keys fail it."""
    raw = _load(REPO / "clusters" / "aws.yaml")
    fractional = copy.deepcopy(raw)
    fractional["available_node_types"]["teacher"]["resources"]["teacher_gpu"] = 0.5
    with pytest.raises(jsonschema.ValidationError, match="integer"):
        validate_config(prepare_config(fractional))
    unknown = copy.deepcopy(raw)
    unknown["available_node_types"]["student"]["gpu_count"] = 4
    with pytest.raises(jsonschema.ValidationError, match="gpu_count"):
        validate_config(prepare_config(unknown))


# ------------------------------------------------------------------------------------------ node types
@pytest.mark.parametrize("path", [REPO / "clusters" / "aws.yaml", REPO / "clusters" / "kuberay.yaml"],
                         ids=lambda p: p.name)
def test_cpu_head_and_two_labelled_gpu_node_types(path: Path) -> None:
    types = _node_types(path)
    head = _type_with_role(types, "head")
    assert head["resources"]["CPU"] == 0
    assert not head["resources"].get("GPU")
    for role in ("teacher", "student"):
        node = _type_with_role(types, role)
        gpus = node["resources"]["GPU"]
        assert gpus >= 1
        # One integer custom resource unit per GPU: what makes the autoscaler pick this type.
        assert node["resources"][f"{role}_gpu"] == gpus
        assert isinstance(node["resources"][f"{role}_gpu"], int)
        other = "student" if role == "teacher" else "teacher"
        assert f"{other}_gpu" not in node["resources"]


@pytest.mark.parametrize("config_path", CLUSTER_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("cluster_path", [REPO / "clusters" / "aws.yaml", REPO / "clusters" / "kuberay.yaml"],
                         ids=lambda p: p.name)
def test_cluster_configs_request_what_the_node_types_offer(config_path: Path, cluster_path: Path) -> None:
    cfg = load_config(config_path)
    types = _node_types(cluster_path)
    teacher, student = _type_with_role(types, "teacher"), _type_with_role(types, "student")
    pool = cfg.teacher.pool
    assert pool.label_selector == {ROLE: "teacher"}
    assert cfg.train.label_selector == {ROLE: "student"}
    assert set(pool.resources) == {"teacher_gpu"} and set(cfg.train.resources_per_worker) == {"student_gpu"}
    # One teacher actor needs what one teacher node has; the whole fixed pool fits on the nodes kept up.
    per_node = min(teacher["resources"]["teacher_gpu"] // pool.resources["teacher_gpu"],
                   int(teacher["resources"]["GPU"] // pool.num_gpus))
    assert per_node >= 1
    assert teacher["min_workers"] * per_node >= pool.max_size, "GPU actor pools must not wait for a scale-up"
    assert pool.num_cpus <= teacher["resources"]["CPU"]
    # The student workers fit on the student type at its maximum size.
    workers_per_node = student["resources"]["student_gpu"] // int(cfg.train.resources_per_worker["student_gpu"])
    assert student["max_workers"] * workers_per_node >= cfg.train.num_workers
    assert cfg.train.use_gpu == "yes" and cfg.teacher.pool.num_gpus >= 1
    assert cfg.train.cpus_per_worker * workers_per_node <= student["resources"]["CPU"]
    # Multi-node: checkpoints and the cache must be on storage every node sees; run folders stay on the head.
    assert (cfg.train.storage_path or "").startswith("s3://") and (cfg.cache.dir or "").startswith("s3://")
    assert Path(cfg.output_dir).is_absolute()


def test_multi_gpu_box_splits_the_gpus_it_starts_ray_with() -> None:
    path = REPO / "configs" / "multi-gpu-box.yaml"
    start = path.read_text().splitlines()[0]
    assert start.startswith("# ray start --head")
    argv = shlex.split(start[2:])
    options = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    gpus, resources = int(options["--num-gpus"]), json.loads(options["--resources"])
    assert resources == {"teacher_gpu": 2, "student_gpu": 6} and gpus == 8
    cfg = load_config(path)
    assert cfg.ray.address == "auto"  # the instance started by that line, with its custom resources
    pool = cfg.teacher.pool
    assert pool.max_size * pool.resources["teacher_gpu"] == resources["teacher_gpu"] == pool.max_size * pool.num_gpus
    assert cfg.train.num_workers * cfg.train.resources_per_worker["student_gpu"] == resources["student_gpu"]
    assert pool.max_size * pool.num_gpus + cfg.train.num_workers == gpus


# ------------------------------------------------------------------------------------------ aws.yaml
def test_aws_image_setup_token_and_storage() -> None:
    raw = _load(REPO / "clusters" / "aws.yaml")
    image = raw["docker"]["image"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_MINOR)}\.\d+-py311-gpu", image), image
    assert raw["file_mounts"]["~/raydistill-src"] == "."
    assert any("pip install" in c and "~/raydistill-src" in c for c in raw["setup_commands"])
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in raw[key] if "ray start" in c]
        assert len(start) == 1 and "export RAY_AUTH_MODE=token;" in start[0]
    for name in ("teacher", "student"):
        assert "IamInstanceProfile" in raw["available_node_types"][name]["node_config"]
    excluded = set(raw["rsync_exclude"])
    assert {"data", "cache", "checkpoints", "models", "raydistill_runs", "*.db", ".env"} <= excluded


def _mlflow_invocation(commands: list[str]) -> list[str]:
    """The `raydistill mlflow-server ...` arguments of a start command (nohup and redirections dropped)."""
    line = next(c for c in commands if "raydistill mlflow-server" in c)
    words = shlex.split(line.split("raydistill mlflow-server", 1)[1].split(">", 1)[0])
    return ["mlflow-server", *words]


def _dry_run(argv: list[str]) -> list[str]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main([*argv, "--dry-run"]) == 0
    return shlex.split(out.getvalue())


@pytest.mark.parametrize("commands_from", ["aws", "local"])
def test_head_starts_an_mlflow_server_with_a_sqlite_store(commands_from: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    raw = _load(REPO / "clusters" / f"{commands_from}.yaml")
    argv = _dry_run(_mlflow_invocation(raw["head_start_ray_commands"]))
    option = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    assert argv[1:4] == ["-m", "mlflow", "server"]
    assert option["--backend-store-uri"].startswith(f"sqlite:///{tmp_path}/")  # absolute, on the head's disk
    assert option["--backend-store-uri"].endswith("/mlflow.db")
    if commands_from == "aws":
        assert option["--artifacts-destination"].startswith("s3://")
    assert option["--host"] == "0.0.0.0" and option["--port"] == "5000"


# ------------------------------------------------------------------------------------------ node commands
def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


def _run_start_command(command: str, tmp_path: Path, ip: str, gpus: int) -> dict[str, Any]:
    """Run one launcher start command with stubs; returns what the stub `ray start` received."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "ray_calls.jsonl"
    recorder = ("import json, os, sys; print(json.dumps({'argv': sys.argv[1:], "
                "'mode': os.environ.get('RAY_AUTH_MODE'), 'mlflow': os.environ.get('MLFLOW_TRACKING_URI')}))")
    _stub(bin_dir, "ray", f'python3 -c "{recorder}" "$@" >> {record}')
    _stub(bin_dir, "hostname", f'echo "{ip} 172.17.0.1"')
    _stub(bin_dir, "nvidia-smi", "".join(f'echo "GPU {i}: NVIDIA A10G (UUID: GPU-{i})"\n' for i in range(gpus)))
    venv = tmp_path / "raydistill-venv" / "bin"
    venv.mkdir(parents=True, exist_ok=True)
    (venv / "activate").write_text("")  # the on-prem commands activate a venv first
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "RAY_HEAD_IP": "10.0.0.10"}
    subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    record.unlink()
    return next(c for c in calls if c["argv"][0] == "start")


@pytest.mark.parametrize(("ip", "gpus", "role"), [("10.0.0.12", 2, "teacher"), ("10.0.0.21", 4, "student")])
def test_on_prem_workers_label_themselves_by_address(ip: str, gpus: int, role: str, tmp_path: Path) -> None:
    raw = _load(REPO / "clusters" / "local.yaml")
    assert ip in raw["provider"]["worker_ips"]
    command = next(c for c in raw["worker_start_ray_commands"] if "ray start" in c)
    call = _run_start_command(command, tmp_path, ip, gpus)
    argv = call["argv"]
    assert f"--labels=raydistill/role={role}" in argv
    resources = next(a for a in argv if a.startswith("--resources="))[len("--resources="):]
    assert json.loads(resources) == {f"{role}_gpu": gpus}
    assert "--address=10.0.0.10:6379" in argv and call["mode"] == "token"


@pytest.mark.parametrize("name", ["aws", "local"])
def test_head_start_exports_the_mlflow_uri_and_token_mode(name: str, tmp_path: Path) -> None:
    raw = _load(REPO / "clusters" / f"{name}.yaml")
    command = next(c for c in raw["head_start_ray_commands"] if "ray start" in c)
    call = _run_start_command(command, tmp_path, "10.1.2.3", 0)
    assert call["mlflow"] == "http://10.1.2.3:5000"  # the head's private address, reachable from every node
    assert call["mode"] == "token"
    assert "--head" in call["argv"] and "--disable-usage-stats" in call["argv"]
    if name == "local":  # no node types on-prem: the head keeps work off itself with its own flags
        assert {"--num-cpus=0", "--num-gpus=0", "--labels=raydistill/role=head"} <= set(call["argv"])


# ------------------------------------------------------------------------------------------ kuberay.yaml
def test_kuberay_manifest_structure() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((REPO / "clusters" / "kuberay.yaml").read_text()) if d}
    assert set(docs) == {"ServiceAccount", "PersistentVolumeClaim", "Service", "RayCluster"}
    cr = docs["RayCluster"]
    assert cr["apiVersion"] == "ray.io/v1" and cr["spec"]["rayVersion"].startswith(RAY_MINOR + ".")
    spec = cr["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"teacher", "student"}
    pool_max = max(load_config(p).teacher.pool.max_size for p in CLUSTER_CONFIGS)
    assert groups["teacher"]["minReplicas"] >= pool_max
    for group in [spec["headGroupSpec"], *groups.values()]:
        assert isinstance(group["rayStartParams"], dict)
        ray_container = group["template"]["spec"]["containers"][0]
        assert ray_container["name"].startswith("ray-")
        env = {e["name"]: e for e in ray_container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
        assert f"ray{RAY_MINOR}." in ray_container["image"] and ray_container["image"].endswith("-gpu")
    for name, group in groups.items():
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(group["resources"][f"{name}_gpu"]) == int(limits["nvidia.com/gpu"])
        assert group["labels"] == {ROLE: name}
    # MLflow: a sidecar on the head, reachable through the Service the URI names.
    head_pod = spec["headGroupSpec"]["template"]["spec"]
    mlflow = next(c for c in head_pod["containers"] if c["name"] == "mlflow")
    service = docs["Service"]
    assert service["spec"]["selector"] == {"ray.io/cluster": cr["metadata"]["name"], "ray.io/node-type": "head"}
    uri = next(e["value"] for e in head_pod["containers"][0]["env"] if e["name"] == "MLFLOW_TRACKING_URI")
    assert uri == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert mlflow["command"][:2] == ["raydistill", "mlflow-server"]
    argv = _dry_run(mlflow["command"][1:])
    assert "sqlite:////mlflow/mlflow.db" in argv and argv[argv.index("--artifacts-destination") + 1].startswith("s3://")
    allowed = argv[argv.index("--allowed-hosts") + 1].split(",")
    assert service["metadata"]["name"] in allowed  # the Host header in-cluster clients send
    volume = next(v for v in head_pod["volumes"] if v["name"] == mlflow["volumeMounts"][0]["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert {head_pod["serviceAccountName"]} == {g["template"]["spec"]["serviceAccountName"] for g in groups.values()}
    assert docs["ServiceAccount"]["metadata"]["name"] == head_pod["serviceAccountName"]


def test_placement_keys_of_the_on_prem_file_match_the_cluster_configs(tmp_path: Path) -> None:
    """local.yaml has no node types: its workers label themselves; the configs must ask for those names."""
    raw = _load(REPO / "clusters" / "local.yaml")
    command = next(c for c in raw["worker_start_ray_commands"] if "ray start" in c)
    teacher = _run_start_command(command, tmp_path, raw["provider"]["worker_ips"][0], 1)["argv"]
    for path in CLUSTER_CONFIGS:
        cfg = load_config(path)
        assert f"--labels=raydistill/role={cfg.teacher.pool.label_selector[ROLE]}" in teacher
        assert set(cfg.teacher.pool.resources) <= set(json.loads(
            next(a for a in teacher if a.startswith("--resources="))[len("--resources="):]))
    assert raw["min_workers"] == len(raw["provider"]["worker_ips"])
    assert os.path.basename(raw["auth"]["ssh_private_key"]).startswith("id_")


def test_clusters_doc_gives_the_local_instance_settings_for_ray_start() -> None:
    # docs/clusters.md tells users of small clusters to export what raydistill sets for its own local instances.
    from raydistill.pipeline.ray_env import LOCAL_RAY_ENV

    doc = (REPO / "docs" / "clusters.md").read_text()
    for key, value in LOCAL_RAY_ENV.items():
        assert f"export {key}={value} " in doc, key
