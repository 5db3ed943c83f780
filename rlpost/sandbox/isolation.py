"""The bubblewrap command line that isolates one run (see docs/sandbox.md for what it
does and does not guarantee).

The sandbox's filesystem is built from nothing: read-only binds of /usr (and the
interpreter's prefix when it lives elsewhere), a fresh /proc of its own PID namespace, a
minimal /dev, and a size-capped tmpfs as the only writable directory. Nothing else of
the host (its /tmp, /home, /root, the repository, other runs) exists inside. All
namespaces are new: no network but a loopback of its own, no view of host processes.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from rlpost.errors import SandboxError

WORKDIR = "/sandbox"  # the run's writable working directory inside the sandbox
MAIN = f"{WORKDIR}/main.py"
# In a session the workspace belongs to the user, so the program is mounted beside it,
# read-only, instead of inside it.
PROGRAM_DIR = "/.rlpost"
BASH = "/usr/bin/bash"
SHM_BYTES = 8 << 20

# What the interpreter may need from /etc; everything else there stays outside.
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime", "/etc/alternatives")

# The only environment a program sees; the server's own variables never reach it.
SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": WORKDIR,
    "TMPDIR": WORKDIR,
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",  # thread stacks count against RLIMIT_AS
    "PYTHONDONTWRITEBYTECODE": "1",
}


def find_bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxError(
            "bubblewrap (`bwrap`) is not installed; the sandbox refuses to run code without "
            "isolation. Install it: `apt-get install -y bubblewrap`"
        )
    return path


def default_python() -> str:
    """Debian's /usr/bin/python3 (stdlib only, inside /usr) when present, else the
    interpreter running the server."""
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def _root_binds(python: str) -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):  # merged-/usr layouts: keep them symlinks
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for path in _ETC_FILES:
        args += ["--ro-bind-try", path, path]
    prefix = Path(os.path.realpath(python)).parent.parent
    if not str(prefix).startswith("/usr"):  # e.g. a pyenv or conda interpreter
        args += ["--ro-bind", str(prefix), str(prefix)]
    return args


# Inside the sandbox, the program runs under coreutils' timeout with this much more than
# the run's own deadline: a backstop that only acts when the server that should kill
# the run at its deadline is gone. Once in CI a SIGKILLed server left a run behind
# (likely, not proven: killed before bwrap's child armed --die-with-parent); a sleeping
# program uses no CPU, so RLIMIT_CPU would never end it.
BACKSTOP_GRACE_S = 5.0


def bwrap_argv(
    bwrap: str, python: str, host_main: Path, disk_bytes: int, wall_limit_s: float,
    *, language: str = "python", workspace: Path | None = None,
) -> list[str]:
    """argv running ``host_main`` (a file the sandbox may read: a Python program, or a
    bash script when ``language == "bash"``) in /sandbox, SIGKILLed inside the sandbox
    ``wall_limit_s + BACKSTOP_GRACE_S`` after it starts.

    Without ``workspace``, /sandbox is a fresh tmpfs of ``disk_bytes`` holding the program
    as /sandbox/main.py (or main.sh). With it (a session), /sandbox is that host directory,
    bound writable, and the program is mounted read-only under /.rlpost: the session's
    workspace is the only host directory the run can see or write."""
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"]
    args += ["--hostname", "sandbox", "--clearenv"]
    for key, value in SANDBOX_ENV.items():
        args += ["--setenv", key, value]
    args += _root_binds(python)
    args += ["--proc", "/proc", "--dev", "/dev"]
    # /dev is a tmpfs of bwrap's: read-only, except a small /dev/shm for multiprocessing's
    # semaphores (both tmpfs sizes count against the run's memory cgroup).
    args += ["--size", str(SHM_BYTES), "--tmpfs", "/dev/shm", "--remount-ro", "/dev"]
    name = "main.sh" if language == "bash" else "main.py"
    if workspace is None:
        args += ["--size", str(disk_bytes), "--perms", "0755", "--tmpfs", WORKDIR]
        program = f"{WORKDIR}/{name}"
    else:
        args += ["--bind", str(workspace), WORKDIR]
        program = f"{PROGRAM_DIR}/{name}"
    args += ["--symlink", WORKDIR, "/tmp"]
    args += ["--ro-bind", str(host_main), program, "--chdir", WORKDIR]
    args += ["--remount-ro", "/"]  # bwrap's own root tmpfs; /sandbox stays writable
    backstop = []
    timeout = "/usr/bin/timeout"  # coreutils, inside the /usr bind
    if os.path.exists(timeout):
        backstop = [timeout, "--signal=KILL", f"{wall_limit_s + BACKSTOP_GRACE_S:.1f}"]
    if language == "bash":
        return args + ["--", *backstop, BASH, "--noprofile", "--norc", program]
    # -u: unbuffered, so output printed before a timeout kill is still reported.
    # -E -s: ignore PYTHON* variables and the user site directory. -B: -E drops
    # PYTHONDONTWRITEBYTECODE, and a .pyc written into a session's workspace would mask an
    # edit made within the same second (same size, same mtime): the edit would not run.
    if workspace is None:
        return args + ["--", *backstop, python, "-u", "-E", "-s", "-B", MAIN]
    # The program lives outside the workspace, but its imports should find the
    # workspace's modules as a script there would, so /sandbox goes first on sys.path;
    # only after runpy itself is imported (-I: no working directory on the path), so a
    # runpy.py in the workspace cannot take over every later Python call.
    runner = f"import runpy, sys; sys.path.insert(0, {WORKDIR!r}); runpy.run_path({program!r}, run_name='__main__')"
    return args + ["--", *backstop, python, "-u", "-I", "-B", "-c", runner]
