"""Root-only launcher of bubblewrap for the tool sandbox. Standard library only.

Run as ``python -I -S sandbox_launch.py SPEC_JSON`` by :mod:`rollout.sandbox` when the rollout
process is root. In a private mount namespace (nothing leaks to the host's), it bind-mounts each
directory the sandbox needs onto a world-traversable staging path (``/root`` and friends are often
0700), drops to the unprivileged ``uid``/``gid`` with no supplementary groups, then executes bwrap,
which binds from the staging paths. The sandbox's processes are then that user on the host, not
root: no owner rights over root's files and subject to RLIMIT_NPROC.
"""

import ctypes
import json
import os
import sys

CLONE_NEWNS, MS_BIND, MS_REC, MS_PRIVATE = 0x00020000, 4096, 16384, 1 << 18


def main() -> None:
    spec = json.loads(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        sys.exit(f"sandbox: unshare(CLONE_NEWNS) failed: {os.strerror(ctypes.get_errno())}")
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        sys.exit(f"sandbox: making / private failed: {os.strerror(ctypes.get_errno())}")
    for src, dst in spec["binds"]:
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "a").close()
        if libc.mount(src.encode(), dst.encode(), None, MS_BIND | MS_REC, None) != 0:
            sys.exit(f"sandbox: bind {src} failed: {os.strerror(ctypes.get_errno())}")
    os.setgroups([])
    os.setgid(int(spec["gid"]))
    os.setuid(int(spec["uid"]))
    os.execv(spec["argv"][0], spec["argv"])


if __name__ == "__main__":
    main()
