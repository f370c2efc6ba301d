"""Launch the engines a `rollout` config asks for (or attach to given URLs) and build the fleet."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import List, Optional

from ..config import RolloutConfig
from .processes import ServerProcess, free_port, redact, start_all, start_on_free_ports
from .sglang import router_command, sglang_server_command

logger = logging.getLogger(__name__)


def local_engine_command(cfg: RolloutConfig, model_path: str, port: int, *, index: int = 0) -> List[str]:
    """`python -m rollout.engines.local` with the config's precision, batching and seed."""
    cmd = [sys.executable, "-m", "rollout.engines.local",
           "--model", model_path, "--host", cfg.host, "--port", str(port),
           "--precision", cfg.precision,
           "--max-batch-size", str(cfg.local.max_batch_size),
           "--batch-wait-ms", str(cfg.local.batch_wait_ms),
           "--threads", str(cfg.local.threads),
           "--random-seed", str(cfg.seed + index),
           "--weight-version", str(cfg.weight_version)]
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    return cmd


@dataclass
class LaunchedEngines:
    """What :func:`start_engines` started; ``stop()`` stops it all by pid."""

    servers: List[ServerProcess] = field(default_factory=list)
    urls: List[str] = field(default_factory=list)
    router_url: Optional[str] = None
    log_dir: str = ""

    def stop(self) -> None:
        for s in reversed(self.servers):
            s.stop()

    def __enter__(self) -> "LaunchedEngines":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_engines(cfg: RolloutConfig, model_path: Optional[str] = None,
                   log_dir: Optional[str] = None) -> LaunchedEngines:
    """Start ``cfg.num_engines`` engines (and a router if configured); wait until all are healthy.

    With ``cfg.urls`` set nothing is started: the URLs (and ``sglang.router_url``) are returned.
    """
    if cfg.urls:
        return LaunchedEngines(urls=list(cfg.urls), router_url=cfg.sglang.router_url)
    model_path = model_path or cfg.model_path
    if not model_path:
        raise ValueError("rollout.model_path (or the trainer's model.hf_path) is needed to launch engines")
    if cfg.engine == "local" and cfg.kv_cache_dtype != "auto":
        logger.warning("rollout.kv_cache_dtype = %s is an SGLang option: the local engine keeps its KV cache "
                       "in the compute dtype", cfg.kv_cache_dtype)
    log_dir = log_dir or cfg.log_dir or tempfile.mkdtemp(prefix="rollout-engines-")
    os.makedirs(log_dir, exist_ok=True)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    urls: List[str] = []

    def make_servers() -> List[ServerProcess]:
        servers = []
        urls.clear()
        for i in range(cfg.num_engines):
            port = cfg.base_port + i if cfg.base_port else free_port(cfg.host)
            if cfg.engine == "sglang":
                cmd = sglang_server_command(cfg, model_path, port, index=i)
            else:
                cmd = local_engine_command(cfg, model_path, port, index=i)
            url = f"http://{host}:{port}"
            logger.info("launching %s engine %d: %s", cfg.engine, i, " ".join(redact(cmd)))
            servers.append(ServerProcess(cmd, url, os.path.join(log_dir, f"engine-{i}.log"),
                                         name=f"{cfg.engine}-engine-{i}", api_key=cfg.api_key))
            urls.append(url)
        return servers

    if cfg.base_port:  # the user's ports: a taken one is an error to report, not to work around
        servers = start_all(make_servers(), cfg.startup_timeout_s)
    else:
        servers = start_on_free_ports(make_servers, cfg.startup_timeout_s)
    router_url = cfg.sglang.router_url if cfg.engine == "sglang" else None  # local engines: no router
    launched = LaunchedEngines(servers=servers, urls=urls, router_url=router_url, log_dir=log_dir)
    if cfg.engine == "sglang" and cfg.sglang.router:
        rport = cfg.sglang.router_port
        router = ServerProcess(router_command(cfg, urls, port=rport), f"http://{host}:{rport}",
                               os.path.join(log_dir, "router.log"), name="sglang-router")
        try:
            start_all([router], cfg.startup_timeout_s)
        except BaseException:
            launched.stop()
            raise
        launched.servers.append(router)
        launched.router_url = router.url
    return launched


def make_fleet(cfg: RolloutConfig, launched: LaunchedEngines):
    """A :class:`rollout.fleet.Fleet` over launched (or attached) engines."""
    from ..fleet import Fleet

    return Fleet.from_urls(launched.urls, api_key=cfg.api_key, client_config=cfg.client,
                           router_url=launched.router_url, max_concurrent=cfg.max_concurrent_requests)
