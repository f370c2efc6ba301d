"""OS-level isolation of the tool sandbox with bubblewrap (``bwrap``, Debian package ``bubblewrap``).

:func:`bwrap_command` builds the command line that runs ``sandbox_child.py`` with:

- new user, PID, mount, network, IPC, UTS and cgroup namespaces (``--unshare-all --unshare-user``),
  no further user namespaces inside (``--disable-userns``), a new session (no TIOCSTI into our tty);
- no capabilities, ``no_new_privs`` (bwrap always sets it), and a seccomp filter (x86-64) that
  refuses namespace, mount, ptrace, keyring, bpf, perf, io_uring and module syscalls;
- a file system of read-only binds of only the shared libraries (``/usr/lib*``), the Python runtime
  (``sys.base_prefix``, ``sys.prefix``) and the run's own directory (child script + code), a
  private ``/proc`` of the new PID namespace, a minimal ``/dev``, and a size-capped private tmpfs
  as the work directory (``/sandbox``) and ``/tmp``; no ``/etc``, no home, no ``/work``;
- an unprivileged user *outside* as well: when we are root, :mod:`rollout.sandbox_launch` drops to
  ``sandbox.user`` before executing bwrap, so the sandbox's processes are that user on the host
  (root outside would be exempt from RLIMIT_NPROC, the process limit);
- the whole tree dies with its PID namespace: when the code's process exits or bwrap is killed
  (``--die-with-parent``), the kernel kills every process left in the namespace.
"""

from __future__ import annotations

import functools
import os
import platform
import pwd
import shutil
import struct
import subprocess
import sys
from typing import List, Optional, Tuple

INSIDE_WORK, INSIDE_RUN = "/sandbox", "/run/sandbox"

# x86-64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl) refused with EPERM.
_X86_64_DENY = {
    "ptrace": 101, "syslog": 103, "personality": 135, "pivot_root": 155, "chroot": 161, "acct": 163,
    "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170,
    "setdomainname": 171, "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176,
    "quotactl": 179, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
    "unshare": 272, "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313,
    "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
}
_CLONE, _CLONE3 = 56, 435
_NS_FLAGS = 0x7E020080  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME
_AUDIT_ARCH_X86_64 = 0xC000003E
_EPERM, _ENOSYS = 1, 38


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def seccomp_program() -> Optional[bytes]:
    """A classic-BPF seccomp filter (struct sock_filter[]) for x86-64, None on other machines.

    Layout follows seccomp(2)'s example: check the architecture, refuse the x32 ABI, refuse the
    listed syscalls and namespace-creating clone() flags with EPERM, clone3() with ENOSYS (its flags
    live in memory a filter cannot read; libc then falls back to clone), allow the rest.
    """
    if platform.machine() != "x86_64":
        return None
    ld_w_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, errno_, kill = 0x7FFF0000, 0x00050000, 0x80000000
    deny = sorted(_X86_64_DENY.values())
    prog = [_insn(ld_w_abs, 0, 0, 4), _insn(jeq, 1, 0, _AUDIT_ARCH_X86_64), _insn(ret, 0, 0, kill),
            _insn(ld_w_abs, 0, 0, 0), _insn(jge, 0, 1, 0x40000000), _insn(ret, 0, 0, errno_ | _EPERM)]
    for nr in deny:
        prog += [_insn(jeq, 0, 1, nr), _insn(ret, 0, 0, errno_ | _EPERM)]
    prog += [_insn(jeq, 0, 1, _CLONE3), _insn(ret, 0, 0, errno_ | _ENOSYS),
             _insn(jeq, 0, 3, _CLONE), _insn(ld_w_abs, 0, 0, 16),  # clone's flags: args[0], low word
             _insn(jset, 0, 1, _NS_FLAGS), _insn(ret, 0, 0, errno_ | _EPERM),
             _insn(ret, 0, 0, allow)]
    return b"".join(prog)


@functools.lru_cache(maxsize=1)
def bwrap_path() -> Optional[str]:
    return shutil.which("bwrap")


@functools.lru_cache(maxsize=4)
def bwrap_unusable(user: str) -> Optional[str]:
    """None when bwrap exists and can create the namespaces here, else the reason it cannot."""
    exe = bwrap_path()
    if exe is None:
        return "bubblewrap (bwrap) is not installed (Debian/Ubuntu: apt-get install -y bubblewrap)"
    kw = {}
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            return f"rollout.sandbox.user {user!r} does not exist on this machine"
        kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    probe = [exe, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
             "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"]
    try:
        out = subprocess.run(probe, capture_output=True, text=True, timeout=30, **kw)
    except (OSError, subprocess.SubprocessError) as e:
        return f"bwrap could not run: {e}"
    if out.returncode != 0:
        return f"bwrap cannot create namespaces here: {out.stderr.strip()[-300:]}"
    return None


def runtime_dirs() -> List[str]:
    """Directories the child's Python needs, read-only: shared libraries and the interpreter's prefixes."""
    dirs = [d for d in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/local/lib") if os.path.isdir(d)]
    for prefix in {sys.base_prefix, sys.prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}:
        real = os.path.realpath(prefix)
        if real not in ("/", "/usr") and not any(real == d or real.startswith(d + "/") for d in dirs):
            dirs.append(prefix)
    if os.path.realpath(sys.base_prefix) == "/usr":  # a system Python lives in /usr/bin
        dirs.append(os.path.realpath(sys.executable))
    return dirs


def bwrap_command(run_dir: str, child_argv: List[str], disk_mb: int, seccomp_fd: Optional[int],
                  sources: Optional[dict] = None, env: Optional[dict] = None) -> List[str]:
    """The bwrap argv. ``sources`` maps a runtime dir to the path bwrap should bind it from (the
    root launcher's staging copy); absent entries bind from their own path."""
    sources = sources or {}
    cmd = [bwrap_path(), "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
           "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox", "--clearenv",
           # The private /tmp first: a runtime dir under the host's /tmp (a venv in a checkout
           # there) is bound on top of it below, not hidden by it.
           "--size", str(16 << 20), "--tmpfs", "/tmp"]
    for link in ("/lib", "/lib64", "/lib32", "/bin", "/sbin"):
        if os.path.islink(link):
            cmd += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link) and link.startswith("/lib"):
            cmd += ["--ro-bind", link, link]
    for d in runtime_dirs():
        cmd += ["--ro-bind", sources.get(d, d), d]
    if os.path.exists("/etc/ld.so.cache"):
        cmd += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    cmd += ["--ro-bind", sources.get(run_dir, run_dir), INSIDE_RUN, "--proc", "/proc", "--dev", "/dev",
            "--size", str(disk_mb << 20), "--perms", "0700", "--tmpfs", INSIDE_WORK,
            "--remount-ro", "/", "--chdir", INSIDE_WORK]
    for key, value in (env or {}).items():
        cmd += ["--setenv", key, value]
    if seccomp_fd is not None:
        cmd += ["--seccomp", str(seccomp_fd)]
    return cmd + ["--"] + child_argv


def seccomp_fd() -> Optional[int]:
    """An inheritable file descriptor holding :func:`seccomp_program` (None where there is none)."""
    prog = seccomp_program()
    if prog is None:
        return None
    fd = os.memfd_create("sandbox-seccomp", 0)
    os.write(fd, prog)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def staging(run_dir: str, base: str) -> Tuple[dict, List[Tuple[str, str]]]:
    """Root only: where the launcher bind-mounts each runtime dir (and ``run_dir``) under ``base``
    so that the unprivileged bwrap can traverse to it (``/root`` is 0700 on many images).
    Returns (sources for :func:`bwrap_command`, (src, dst) pairs for the launcher)."""
    sources, pairs = {}, []
    for i, d in enumerate(runtime_dirs() + [run_dir]):
        dst = os.path.join(base, str(i))
        sources[d] = dst
        pairs.append((d, dst))
    return sources, pairs
