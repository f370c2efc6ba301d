"""The sandbox child: confine this process, then run the model's code. Standard library only.

Run as ``python -I sandbox_child.py CONFIG_JSON`` by :mod:`rollout.sandbox` (never imported),
inside bubblewrap's namespaces (:mod:`rollout.sandbox_bwrap`, the boundary) or, in the unisolated
fallback, directly. In order: (1) in the fallback, a private network namespace when asked and
permitted, (2) in the fallback, drop root to ``nobody``, (3) resource limits (address space, CPU
seconds, file size, processes, no core dumps), (4) an audit hook (PEP 578) that refuses sockets,
process creation, ``ctypes`` and writes outside the work directory: a friendly early error for
naive code, never the boundary (the code can disarm it), (5) run the code as ``__main__``.
Exit codes: 0 ok, 1 uncaught exception, 3 memory limit, 4 confinement could not be set up.
"""

import builtins
import ctypes
import json
import os
import resource
import sys
import traceback

MEMORY_EXIT, SETUP_EXIT = 3, 4
CLONE_NEWNET = 0x40000000
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
               "os.chmod": (0,), "os.chown": (0,), "os.symlink": (0, 1), "os.link": (0, 1),
               "os.truncate": (0,), "os.utime": (0,), "shutil.rmtree": (0,), "os.chflags": (0,),
               "os.lchown": (0,), "os.mkfifo": (0,), "os.mknod": (0,), "shutil.move": (0, 1)}
DENIED = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
          "os.forkpty", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function",
          "ctypes.cdata", "os.kill", "os.killpg", "signal.pthread_kill", "socket.__new__",
          "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
          "socket.gethostbyname", "socket.gethostbyaddr", "os.setuid", "os.setgid", "sys.remote_exec"}


def _unshare_network() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(CLONE_NEWNET) == 0
    except (OSError, AttributeError):
        return False


def _limits(cfg: dict) -> None:
    mem = int(cfg["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    cpu = int(cfg["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    fsize = int(cfg["fsize_bytes"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if cfg.get("max_processes"):
        procs = int(cfg["max_processes"])
        resource.setrlimit(resource.RLIMIT_NPROC, (procs, procs))


def _install_hook(root: str, block_sockets: bool) -> None:
    root = os.path.realpath(root)

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor
        try:
            full = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return full == root or full.startswith(root + os.sep)

    def hook(event, args):
        if event.startswith("socket."):
            if block_sockets:
                raise PermissionError(f"sandbox: {event} is not allowed (no network)")
        elif event in DENIED:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in str(mode) for c in "wax+")) or \
                     (flags is not None and flags & WRITE_FLAGS)
            if writes and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
        elif event in PATH_EVENTS:
            for i in PATH_EVENTS[event]:
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the sandbox directory")

    sys.addaudithook(hook)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    with open(cfg["code_file"]) as f:
        code = f.read()
    if cfg["network"] in ("namespace", "auto"):  # "isolated": bwrap already made a new one
        if not _unshare_network() and cfg["network"] == "namespace":
            sys.stderr.write("sandbox: cannot create a network namespace (needs root)\n")
            os._exit(SETUP_EXIT)
    uid = cfg.get("uid")
    if uid is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setgid(int(cfg["gid"]))
        os.setuid(int(uid))
    _limits(cfg)
    os.chdir(cfg["dir"])
    sys.path.insert(0, cfg["dir"])
    compiled = compile(code, "<tool>", "exec")
    _install_hook(cfg["dir"], block_sockets=cfg["network"] != "namespace")
    try:
        exec(compiled, {"__name__": "__main__", "__builtins__": builtins})
    except MemoryError:
        sys.stderr.write("MemoryError: the sandbox memory limit was exceeded\n")
        sys.stderr.flush()
        os._exit(MEMORY_EXIT)
    except SystemExit:
        raise
    except BaseException as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename != __file__]
        sys.stderr.write("Traceback (most recent call last):\n" + "".join(traceback.format_list(frames[-5:])))
        sys.stderr.write("".join(traceback.format_exception_only(type(e), e)))
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()


if __name__ == "__main__":
    main()
