"""SGLang's server with the API key read from a file, never from its command line.

    ROLLOUT_API_KEY_FILE=<0600 file> python -m megatron_alp.launch.sglang_main [sglang.launch_server args]

A command line is world-readable (``/proc/<pid>/cmdline``, ``ps``) on a shared node; a 0600 file in
the job folder is not. The key is appended to the arguments inside this process, which then runs
``sglang.launch_server`` as ``__main__`` (SGLang 0.5.23 parses ``sys.argv[1:]`` there; its scheduler
processes get the parsed ServerArgs through multiprocessing, not through a command line). Imports
nothing heavy itself: the Python of the SGLang step (a container's) only needs SGLang.
"""

from __future__ import annotations

import os
import runpy
import sys


def key_args(environ=os.environ) -> list:
    """``["--api-key", key]`` from ROLLOUT_API_KEY_FILE (or ROLLOUT_API_KEY), else nothing."""
    path = environ.get("ROLLOUT_API_KEY_FILE")
    if path:
        try:
            with open(path) as f:
                key = f.read().strip()
        except OSError as e:
            raise SystemExit(f"ROLLOUT_API_KEY_FILE={path}: cannot read the API key: {e}") from None
        if not key:
            raise SystemExit(f"ROLLOUT_API_KEY_FILE={path} is empty")
        return ["--api-key", key]
    key = environ.get("ROLLOUT_API_KEY", "")
    return ["--api-key", key] if key else []


def main() -> None:
    if "--api-key" in sys.argv:
        raise SystemExit("--api-key on the command line: pass it in ROLLOUT_API_KEY_FILE instead")
    sys.argv = ["sglang.launch_server", *sys.argv[1:], *key_args()]
    os.environ.pop("ROLLOUT_API_KEY", None)
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
