"""The rollout side of a SLURM job: each rollout node's server command lines, the weights they
start on, and the health wait.

Command lines come from the rollout package (``sglang_server_command``, ``local_engine_command``),
so a SLURM-launched engine is exactly the one the trainer would launch locally, with three
differences: it binds the plan's address (all interfaces on a rollout node), engine ``k`` of the
fleet gets seed ``rollout.seed + k`` across nodes, and the API key reaches the local engine through
its environment (``ROLLOUT_API_KEY``) rather than its command line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Dict, List, Optional, Tuple

logger = logging.getLogger(__name__)


def engine_start_path(cfg) -> Tuple[str, int]:
    """(model path, weight version) the engines start on.

    A fresh run: the HF checkpoint (``rollout.model_path`` or ``model.hf_path``), version 0. A run
    that will resume: the disk-bus version of the trainer's latest checkpoint, so the engines serve
    the weights the resumed trainer has (it republishes that version, but does not push it to
    attached engines). If the bus no longer holds it, the HF weights, with a warning.
    """
    from rollout.bus.versions import version_dirname

    from .checks import torch_here

    if torch_here():
        from ..trainer.checkpoint import latest_checkpoint
    else:  # a container job's batch host: the same `latest` pointer, read without torch
        latest_checkpoint = _latest_pointer
    base = cfg.rollout.model_path or cfg.model.hf_path
    latest = latest_checkpoint(cfg.checkpoint.dir or os.path.join(cfg.run.output_dir, "checkpoints"))
    if not latest:
        return base, 0
    try:
        with open(os.path.join(latest, "meta.json")) as f:
            version = int(json.load(f).get("bus_version", 0))
    except (OSError, ValueError) as e:
        logger.warning("cannot read the bus version of checkpoint %s (%s): engines start on %s", latest, e, base)
        return base, 0
    if version == 0 or cfg.bus.backend != "disk":
        return base, 0  # the streaming backends push the resumed weights themselves
    path = os.path.abspath(os.path.join(cfg.bus.dir, version_dirname(version)))
    if os.path.isfile(os.path.join(path, "config.json")):
        logger.info("resuming from %s: engines start on bus version %d (%s)", latest, version, path)
        return path, version
    logger.warning("resuming from %s (bus version %d), but %s is gone (bus.keep): the engines start on %s "
                   "and the first rollout is off-policy until the first update", latest, version, path, base)
    return base, 0


def keyed_sglang(cmd: List[str]) -> List[str]:
    """SGLang's command through :mod:`.sglang_main`, which reads the API key from its file."""
    i = cmd.index("sglang.launch_server")
    return [*cmd[:i], "megatron_alp.launch.sglang_main", *cmd[i + 1:]]


def write_key_file(log_dir: str, api_key: str) -> str:
    """The job's API key in ``<job dir>/api_key`` (mode 0600): SGLang reads it from there."""
    path = os.path.join(log_dir, "api_key")
    os.makedirs(log_dir, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(api_key)
    return path


def _latest_pointer(root: Optional[str]) -> Optional[str]:
    """trainer.checkpoint.latest_checkpoint's reading of ``<root>/latest``, without importing torch."""
    ptr = os.path.join(root or "", "latest")
    if not root or not os.path.isfile(ptr):
        return None
    with open(ptr) as f:
        path = os.path.join(root, f.read().strip())
    return path if os.path.isdir(path) else None


def build_engine_spec(cfg, plan, model_path: str, version: int, api_key: Optional[str],
                      log_dir: str, python: Optional[str] = None) -> Dict[str, List[dict]]:
    """{rollout node: [{cmd, url, log, name, env, api_key}, ...]} for node.py's ``engines`` role.

    ``python`` replaces this interpreter in the commands (the steps may run in a container). The
    API key never is on a command line: SGLang reads it from a 0600 file of the job folder
    (:mod:`.sglang_main`), the local engine from its environment."""
    from rollout.engines.sglang import sglang_server_command
    from rollout.engines.start import local_engine_command

    r = cfg.rollout
    out: Dict[str, List[dict]] = {}
    if plan.mode == "attached":
        return out
    key_file = write_key_file(log_dir, api_key) if api_key and r.engine == "sglang" else None
    for n, node in enumerate(plan.rollout_nodes):
        entries = []
        for i, port in enumerate(plan.engine_ports):
            k = n * plan.engines_per_node + i
            if r.engine == "sglang":
                rc = dataclasses.replace(r, seed=r.seed + k - i, api_key=None, weight_version=str(version))
                cmd = keyed_sglang(sglang_server_command(rc, model_path, port, index=i, host=plan.engine_bind))
                env = {"ROLLOUT_API_KEY_FILE": key_file} if api_key else {}
            else:
                rc = dataclasses.replace(r, seed=r.seed, host=plan.engine_bind, api_key=None,
                                         weight_version=str(version))
                cmd = local_engine_command(rc, model_path, port, index=k)
                env = {"ROLLOUT_API_KEY": api_key} if api_key else {}
            if python and cmd[0] == sys.executable:
                cmd[0] = python
            entries.append({"cmd": cmd, "url": f"http://{plan.engine_host(node)}:{port}",
                            "log": os.path.join(log_dir, f"engine-{node}-{i}.log"),
                            "name": f"{r.engine}-engine-{k}", "env": env, "api_key": api_key})
        out[node] = entries
    return out


def healthy(url: str, api_key: Optional[str], timeout_s: float = 2.0) -> bool:
    req = urllib.request.Request(url.rstrip("/") + "/health")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(urls: List[str], api_key: Optional[str], timeout_s: float,
                 alive: Callable[[], bool], poll_s: float = 1.0) -> List[str]:
    """Poll every URL's /health until all answer 200; returns those that did not (empty = all
    healthy). Stops early when ``alive()`` turns false (the servers' step exited)."""
    pending = list(urls)
    deadline = time.monotonic() + timeout_s
    while pending:
        pending = [u for u in pending if not healthy(u, api_key)]
        if not pending or not alive() or time.monotonic() > deadline:
            break
        time.sleep(poll_s)
    return pending
