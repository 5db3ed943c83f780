"""docs/deployment.md's sandbox service: the Kubernetes manifest is a valid Deployment
and Service (Kubernetes' own schema, strict), and every documented server command line
(the systemd ExecStart, the container's command + args) parses with the server's own
argument parser and keeps the token off the command line."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from rlpost.sandbox.__main__ import build_parser

DOC = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"
SECTION = DOC.read_text().split("## The code sandbox service", 1)[1]


def fences(lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", SECTION, re.S | re.M)


def check_serve_args(argv):
    assert argv[:2] == ["-m", "rlpost.sandbox"], argv
    args = build_parser().parse_args(argv[2:])  # exits (SystemExit) on an unknown flag
    assert args.command == "serve" and args.host == "0.0.0.0" and args.token_file
    assert "--token-file" in argv  # the parser has no flag that takes the token itself
    return args


def test_systemd_unit_runs_the_server_with_a_token_file():
    (unit,) = fences("ini")
    (exec_start,) = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart=")]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/python")
    args = check_serve_args(argv[1:])
    assert (args.max_concurrency, args.max_sessions) == (8, 64)
    assert "KillMode=mixed" in unit and "PrivateTmp=yes" in unit


def test_kubernetes_manifest_is_a_valid_deployment_and_service():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the launch extra")
    (manifest,) = fences("yaml")
    docs = list(yaml.safe_load_all(manifest))
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    for doc in docs:
        kv.validate(doc, kv.latest_version(), strict=True)  # raises on a malformed object
    deployment, service = docs
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"] == pod["metadata"]["labels"] == deployment["spec"]["selector"]["matchLabels"]
    (container,) = pod["spec"]["containers"]
    argv = container["command"][1:] + container["args"]
    args = check_serve_args(argv)
    assert args.advertise_url == "http://$(POD_IP):8900" and args.port == 8900
    assert any(e["name"] == "POD_IP" for e in container["env"])  # what $(POD_IP) expands from
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    (mount,) = container["volumeMounts"]
    assert args.token_file.startswith(mount["mountPath"] + "/")
    (volume,) = pod["spec"]["volumes"]
    assert volume["name"] == mount["name"] and "secret" in volume
