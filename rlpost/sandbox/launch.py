"""Exec wrapper between the server and bubblewrap: join the run's cgroups, set rlimits,
drop to the run's uid, then exec bwrap with a minimal environment.

It is a separate, single-threaded process on purpose: doing this in ``preexec_fn``
inside the threaded HTTP server is unsafe (CPython documents the deadlock risk). Run as
``python -I -S launch.py SPEC_JSON BWRAP_ARGV...``; stdlib only, nothing from rlpost.
"""

import ctypes
import json
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    spec = json.loads(sys.argv[1])
    argv = sys.argv[2:]
    # Join the cgroups first, so every later fork is already counted and capped.
    for procs in spec["cgroup_procs"]:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    for name, (soft, hard) in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if spec["uid"] is not None:
        # RLIMIT_NPROC is not enforced for uid 0 (and root's processes are counted
        # together), so the program runs under a uid of its own for this concurrency slot.
        os.setgroups([])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
    # If the server dies, this process (soon bwrap, which takes the sandbox with it) is
    # killed too. Set after setuid, which clears it; kept across the exec of bwrap.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != spec["server_pid"]:  # the server died before prctl took effect
        sys.exit(1)
    os.execve(argv[0], argv, spec["env"])


if __name__ == "__main__":
    main()
