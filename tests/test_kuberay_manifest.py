"""The KubeRay manifest (`deploy/kuberay/`): every variable it sets is one the server reads (from the settings model)
and parses there, the token comes from a secret, the replicas get GPUs, one shared volume holds the model cache and
the stores in every pod, the Ray ports stay private, and the import path names the application builder."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pictoprompt.settings import Settings

MANIFEST = Path(__file__).resolve().parents[1] / "deploy" / "kuberay" / "pictoprompt-rayservice.yaml"


@pytest.fixture(scope="module")
def documents() -> dict[str, dict[str, Any]]:
    return {document["kind"]: document for document in yaml.safe_load_all(MANIFEST.read_text())}


def containers(documents: dict[str, dict[str, Any]]) -> Iterator[dict[str, Any]]:
    cluster = documents["RayService"]["spec"]["rayClusterConfig"]
    yield from cluster["headGroupSpec"]["template"]["spec"]["containers"]
    for group in cluster["workerGroupSpecs"]:
        yield from group["template"]["spec"]["containers"]


def the_variables_the_server_reads() -> set[str]:
    prefix = Settings.model_config["env_prefix"]
    return {(prefix + name).upper() for name in Settings.model_fields}


def test_every_variable_set_is_one_the_server_reads_and_parses(documents, monkeypatch):
    readable = the_variables_the_server_reads()
    assert "PICTOPROMPT_RAY_BATCH_SIZE" in readable and "PICTOPROMPT_TOKEN" in readable
    seen = {}
    for container in containers(documents):
        for variable in container.get("env", []):
            assert variable["name"] in readable, f"{container['name']} sets {variable['name']}, which nothing reads"
            seen[variable["name"]] = variable.get("value")
    serve_config = yaml.safe_load(documents["RayService"]["spec"]["serveConfigV2"])
    for application in serve_config["applications"]:
        for name in application.get("runtime_env", {}).get("env_vars", {}):
            assert name in readable
    # The values parse as the settings' types (the secret's aside).
    for name, value in seen.items():
        if value is not None:
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.ray_replica_gpus == 1 and settings.ray_batch_size >= 1
    assert settings.ray_max_replicas >= settings.ray_min_replicas


def test_the_token_comes_from_a_secret_and_only_the_front_has_it(documents):
    head, *workers = containers(documents)
    token = next(variable for variable in head["env"] if variable["name"] == "PICTOPROMPT_TOKEN")
    assert "value" not in token and token["valueFrom"]["secretKeyRef"]["key"]
    assert all(variable["name"] != "PICTOPROMPT_TOKEN" for worker in workers for variable in worker.get("env", []))
    assert "pictoprompt serve --http" in " ".join(head["args"]) and "--ray" in " ".join(head["args"])


def test_the_replicas_run_on_a_gpu_worker_group(documents):
    cluster = documents["RayService"]["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    workers = [
        container for group in cluster["workerGroupSpecs"] for container in group["template"]["spec"]["containers"]
    ]
    assert workers and all(container["resources"]["limits"]["nvidia.com/gpu"] == "1" for container in workers)


def test_one_shared_volume_holds_the_model_cache_and_the_stores_in_every_pod(documents):
    claim = documents["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    cluster = documents["RayService"]["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
        for container in pod["spec"]["containers"]:
            mounts = [m for m in container["volumeMounts"] if volumes[m["name"]]["persistentVolumeClaim"]]
            assert {volumes[m["name"]]["persistentVolumeClaim"]["claimName"] for m in mounts} == {
                claim["metadata"]["name"]
            }
            paths = {variable["name"]: variable.get("value") for variable in container["env"]}
            for store in ("PICTOPROMPT_CACHE_DIR", "PICTOPROMPT_ASSET_DIR", "PICTOPROMPT_DATA_DIR"):
                assert any(Path(paths[store]).is_relative_to(m["mountPath"]) for m in mounts), store
            # The Hugging Face cache (the weights) is on the volume too.
            assert any(m["mountPath"].endswith(".cache/huggingface") for m in mounts)


def test_the_ray_ports_stay_private(documents):
    cluster = documents["RayService"]["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    front = documents["Service"]["spec"]
    assert front["type"] == "ClusterIP" and [port["port"] for port in front["ports"]] == [8080]
    policy = documents["NetworkPolicy"]["spec"]
    open_to_all = [rule for rule in policy["ingress"] if "from" not in rule]
    assert [port["port"] for rule in open_to_all for port in rule["ports"]] == [8080]
    ray_ports = {6379, 8265, 10001, 8000}
    for rule in policy["ingress"]:
        if "from" in rule and "ports" in rule:  # the operator: its dashboard and Serve checks, never the GCS
            assert 6379 not in {port["port"] for port in rule["ports"]}
    assert ray_ports.isdisjoint(port["port"] for rule in open_to_all for port in rule["ports"])


def test_the_import_path_names_the_application_builder(documents):
    serve_config = yaml.safe_load(documents["RayService"]["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    module, attribute = application["import_path"].split(":")
    source = Path(__file__).resolve().parents[1].joinpath(*module.split(".")).with_suffix(".py")
    functions = {node.name for node in ast.walk(ast.parse(source.read_text())) if isinstance(node, ast.FunctionDef)}
    assert attribute in functions
