"""``rlpost <target> [--dry-run] [--submit] [options] +recipe=... [overrides]``.

Targets: ``local`` (in-process, like ``python -m rlpost.train``), ``ray`` (a job on an
existing Ray cluster), ``slurm`` (an sbatch script), ``k8s`` (a KubeRay RayJob).
``rlpost data filter ...`` is ``python -m rlpost.data filter ...`` (difficulty filtering).
Rendered scripts and manifests go to stdout, messages to stderr, so
``rlpost slurm ... > job.sbatch`` works. The config is loaded and validated first:
nothing is rendered or submitted for a config that would not run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rlpost.config.load import load_config
from rlpost.config.schema import RunConfig
from rlpost.errors import RlpostError
from rlpost.launch import k8s, ray_job, slurm
from rlpost.launch.command import shell_line, train_argv
from rlpost.launch.resources import cpus_per_node_for, job_needs, nodes_for

TARGETS = {
    "local": "run in this process (same as python -m rlpost.train)",
    "ray": "submit a Ray job to an existing cluster (--address http://HOST:8265)",
    "slurm": "render an sbatch script (multi-node Ray inside the allocation); --submit runs sbatch",
    "k8s": "render a KubeRay RayJob manifest; --submit creates it",
}


def _parser(target: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"rlpost {target}", description=TARGETS[target])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (+recipe=NAME key=value ...)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run; start or submit nothing")
    if target == "ray":
        parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                            help="Ray dashboard/job server address (default $RAY_ADDRESS or %(default)s)")
        parser.add_argument("--working-dir", type=Path, default=None,
                            help="directory shipped with the job (default: the rlpost checkout, else cwd)")
        parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                            help="extra environment variable for the job (repeatable)")
        parser.add_argument("--submission-id", default=None)
        parser.add_argument("--wait", action="store_true", help="follow the logs; exit non-zero if the job fails")
    if target in ("slurm", "k8s"):
        parser.add_argument("--submit", action="store_true", help="submit instead of only printing")
    if target == "slurm":
        parser.add_argument("--nodes", type=int, default=None, help="default: enough for the GPUs the run needs")
        parser.add_argument("--gpus-per-node", type=int, default=0)
        parser.add_argument("--cpus-per-task", type=int, default=None,
                            help="cores per node (one task per node); default: the run's logical CPUs / nodes")
        parser.add_argument("--ray-cpus-per-node", type=int, default=None,
                            help="logical CPUs Ray advertises per node (default --cpus-per-task); more oversubscribes")
        parser.add_argument("--partition")
        parser.add_argument("--time", help="time limit, e.g. 04:00:00")
        parser.add_argument("--account")
        parser.add_argument("--job-name", default="rlpost")
        env = parser.add_mutually_exclusive_group()
        env.add_argument("--container-image", help="pyxis/enroot image holding rlpost")
        env.add_argument("--venv", default=sys.prefix if sys.prefix != sys.base_prefix else None,
                         help="virtualenv to activate on the nodes (default: this one, %(default)s)")
        parser.add_argument("--chdir", type=Path, default=Path.cwd(), help="job working directory (default: cwd)")
        parser.add_argument("--log-dir", type=Path, default=None, help="default: OUTPUT_DIR/slurm")
        parser.add_argument("--ready-timeout", type=int, default=300, help="seconds to wait for Ray nodes")
    if target == "k8s":
        parser.add_argument("--image", required=True, help="container image with rlpost installed")
        parser.add_argument("--pvc", required=True, help="PersistentVolumeClaim for checkpoints and outputs")
        parser.add_argument("--mount-path", default="/outputs", help="where the PVC is mounted (default %(default)s)")
        parser.add_argument("--namespace", default="default")
        parser.add_argument("--name", default=None, help="RayJob name (default from output_dir)")
        parser.add_argument("--workers", type=int, default=None, help="worker pods (default: enough for the GPUs)")
        parser.add_argument("--gpus-per-worker", type=int, default=0)
        parser.add_argument("--cpus-per-worker", type=int, default=None)
        parser.add_argument("--memory-per-worker", default="16Gi")
        parser.add_argument("--ttl", type=int, default=3600, help="ttlSecondsAfterFinished")
        parser.add_argument("--ray-version", default="", help="rayVersion of the image (optional)")
        parser.add_argument("--kubeconfig", default=None)
        parser.add_argument("--context", default=None)
    return parser


def _local(cfg: RunConfig, args) -> int:
    if args.dry_run:
        print(shell_line(train_argv(args.overrides)))
        return 0
    from rlpost.train import run

    run(cfg)
    return 0


def _ray(cfg: RunConfig, args) -> int:
    working_dir = (args.working_dir or ray_job.default_working_dir()).resolve()
    env = ray_job.job_env(ray_job.parse_env(args.env))
    spec = ray_job.build_spec(cfg, args.overrides, args.address, working_dir, env, args.submission_id)
    for warning in spec.warnings:
        print(f"rlpost: warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(ray_job.describe(spec))
        return 0
    return ray_job.submit(spec, wait=args.wait)


def _slurm(cfg: RunConfig, args) -> int:
    with_gpus = args.gpus_per_node > 0
    needs = job_needs(cfg, with_gpus)
    nodes = args.nodes or nodes_for(needs, args.gpus_per_node)
    cpus = args.cpus_per_task or cpus_per_node_for(needs, nodes)
    workdir = args.chdir.resolve()
    log_dir = args.log_dir or Path(workdir, cfg.output_dir, "slurm")
    opts = slurm.SlurmOptions(
        nodes=nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=cpus,
        ray_cpus_per_node=args.ray_cpus_per_node or cpus, job_name=args.job_name,
        partition=args.partition, time=args.time, account=args.account,
        container_image=args.container_image, venv=None if args.container_image else args.venv,
        workdir=str(workdir), log_dir=str(Path(log_dir).resolve()), ready_timeout_s=args.ready_timeout,
    )
    script = slurm.render(cfg, args.overrides, opts, needs)
    if args.submit and not args.dry_run:
        slurm.submit(script, opts, str(Path(workdir, cfg.output_dir)))
    else:
        print(script, end="")
    return 0


def _k8s(cfg: RunConfig, args) -> int:
    needs = job_needs(cfg, with_gpus=args.gpus_per_worker > 0)
    workers = args.workers or nodes_for(needs, args.gpus_per_worker)
    opts = k8s.K8sOptions(
        image=args.image, pvc=args.pvc, workers=workers, gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker or cpus_per_node_for(needs, workers),
        name=args.name or k8s.default_name(cfg.output_dir), namespace=args.namespace,
        mount_path=args.mount_path, memory_per_worker=args.memory_per_worker,
        ttl_seconds=args.ttl, ray_version=args.ray_version,
    )
    manifest = k8s.render_manifest(cfg, args.overrides, opts, needs)
    if args.submit and not args.dry_run:
        k8s.submit(manifest, args.kubeconfig, args.context)
    else:
        print(k8s.to_yaml(manifest), end="")
    return 0


_RUN = {"local": _local, "ray": _ray, "slurm": _slurm, "k8s": _k8s}


def _usage() -> str:
    lines = ["usage: rlpost {local,ray,slurm,k8s} [--dry-run] [options] +recipe=NAME [key=value ...]", ""]
    lines += [f"  {name:<6} {text}" for name, text in TARGETS.items()]
    lines += ["", "rlpost data filter [--keep LO:HI] [--output DIR] +recipe=NAME [key=value ...]",
              "  pass rates of a dataset under the model, and the prompts in a band (docs/data.md)"]
    lines += ["", "`rlpost TARGET --help` lists a target's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    target, rest = argv[0], argv[1:]
    if target == "data":  # not a launch target: a data command, run here
        from rlpost.data.__main__ import main as data_main

        return data_main(rest)
    if target not in TARGETS:
        print(f"rlpost: error: unknown target {target!r}; choose one of {', '.join(TARGETS)}\n\n{_usage()}",
              file=sys.stderr)
        return 2
    args = _parser(target).parse_intermixed_args(rest)
    try:
        cfg = load_config(args.overrides)
        return _RUN[target](cfg, args)
    except RlpostError as err:
        print(f"rlpost: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
