"""The files in deploy/: valid YAML by yamllint, the Job the same pod as pod.yaml and the restricted pod the same
but for its security (the e2e test runs both with `podman kube play`), the security settings and the seccomp
profile the README promises, and every c2boot command in them one the current CLI accepts."""

import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from container2boot.cli import app

DEPLOY = Path(__file__).parent.parent / "deploy"
YAMLLINT = "{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: {check-keys: false}}}"


def load(name: str) -> Any:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_every_deploy_file_passes_yamllint() -> None:
    files = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) == 6
    result = subprocess.run([sys.executable, "-m", "yamllint", "--strict", "-d", YAMLLINT, *files],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_the_job_runs_the_pod_of_pod_yaml() -> None:
    pod, job = load("kubernetes/pod.yaml"), load("kubernetes/job.yaml")
    assert (pod["kind"], job["kind"]) == ("Pod", "Job")
    assert job["spec"]["template"]["spec"] == pod["spec"]


@pytest.mark.parametrize("name", ["kubernetes/pod.yaml", "kubernetes/job.yaml"])
def test_the_build_pod_is_restricted_but_for_sys_chroot(name: str) -> None:
    manifest = load(name)
    spec = manifest["spec"]["template"]["spec"] if manifest["kind"] == "Job" else manifest["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec)
    assert all("hostPath" not in volume for volume in spec["volumes"])
    [container] = spec["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and "privileged" not in security
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["SYS_CHROOT"]}
    assert container["command"] == ["c2boot", "assemble"] and container["args"][0].startswith("docker://")


def test_the_restricted_pod_is_pod_yaml_without_the_capability_but_with_the_seccomp_profile() -> None:
    pod, manifest = load("kubernetes/pod.yaml")["spec"], load("kubernetes/pod-restricted.yaml")
    restricted = manifest["spec"]
    assert restricted["securityContext"].pop("seccompProfile") == {"type": "Localhost",
                                                                   "localhostProfile": "container2boot.json"}
    annotation = manifest["metadata"]["annotations"]["seccomp.security.alpha.kubernetes.io/pod"]
    assert annotation == "localhost/container2boot.json"  # what podman's kube play reads
    assert restricted["containers"][0]["securityContext"].pop("capabilities") == {"drop": ["ALL"]}
    del pod["securityContext"]["seccompProfile"], pod["containers"][0]["securityContext"]["capabilities"]
    assert restricted == pod


def test_the_seccomp_profile_is_plain_oci_and_allows_the_sandbox() -> None:
    """No conditional rules (containerd would read them as unconditional), and what dracut's sandbox calls."""
    profile = json.loads((DEPLOY / "kubernetes" / "seccomp" / "container2boot.json").read_text())
    assert set(profile) == {"defaultAction", "defaultErrnoRet", "architectures", "syscalls"}
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {name for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" and "args" not in rule
               for name in rule["names"]}
    denied = {name for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ERRNO" for name in rule["names"]}
    assert {"unshare", "mount", "umount2", "chroot", "execve", "clone"} <= allowed
    assert not {"chroot", "unshare", "mount"} & denied and {"init_module", "bpf"} <= denied
    assert all(set(rule) <= {"names", "action", "args", "errnoRet"} for rule in profile["syscalls"])


def c2boot_commands() -> Iterator[tuple[str, list[str]]]:
    """Each c2boot command line of the CI files and the pods, split as the shell would (variables unexpanded)."""
    workflow, gitlab = load("github-actions.yml"), load("gitlab-ci.yml")
    lines = [step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]
    lines += [line for job in gitlab.values() if isinstance(job, dict) and "script" in job for line in job["script"]]
    for line in (part for text in lines for part in text.splitlines()):
        if line.strip().startswith("c2boot "):
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = list(lexer)
            ends = [i for i, word in enumerate(words) if word in (">", ">>", "|", "&&", ";")]
            yield line.strip(), words[1:ends[0] if ends else None]
    for name in ("kubernetes/pod.yaml", "kubernetes/pod-restricted.yaml", "kubernetes/pod-image-volume.yaml"):
        [container] = load(name)["spec"]["containers"]
        yield name, [*container["command"][1:], *container["args"]]


def test_every_c2boot_command_in_them_is_one_the_cli_accepts() -> None:
    group: Any = typer.main.get_command(app)  # click's, or the copy of click newer typers carry
    context = group.context_class(group, info_name="c2boot")
    seen = set()
    for where, argv in c2boot_commands():
        command = group.get_command(context, argv[0])
        assert command is not None, f"{where}: no command {argv[0]}"
        try:
            command.make_context(argv[0], argv[1:], parent=context)
        except Exception as e:  # a usage error: an unknown option, a missing argument, a bad choice
            pytest.fail(f"{where}: {e.format_message() if hasattr(e, 'format_message') else e}")
        seen.add(argv[0])
    assert seen == {"build", "doctor", "assemble", "test"}


def test_the_ci_files_have_the_shape_their_engines_need() -> None:
    workflow = load("github-actions.yml")
    assert set(workflow) >= {"name", True, "jobs"}  # YAML 1.1 reads the key `on` as true, as PyYAML does
    for job in workflow["jobs"].values():
        assert job["runs-on"] and all(("uses" in step) != ("run" in step) for step in job["steps"])
    gitlab = load("gitlab-ci.yml")
    jobs = {name: job for name, job in gitlab.items() if isinstance(job, dict) and "script" in job}
    assert set(jobs) == {"disk", "boot-test"}
    assert all(job["stage"] in gitlab["stages"] for job in jobs.values())
    assert jobs["boot-test"]["needs"] == ["disk"]
