"""Node split of one SLURM allocation: trainer nodes, rollout nodes, engines, URLs, rendezvous.

- **Split** (the 7B/32B/70B scripts): the first ``trainer_nodes`` nodes of the allocation run the
  trainer (torchrun, one process per GPU, rendezvous on the first of them); the remaining nodes are
  rollout nodes, each running ``GPUs / (engine TP x DP)`` SGLang servers on ports
  ``base_port + i``, bound to all interfaces and reached as ``http://<node>:<port>``.
- **Shared** (a one-node allocation): trainer and engines share the node; on GPUs the trainer takes
  the first ``trainer_gpus`` of the node's GPUs and the engines the rest (node.py narrows
  ``CUDA_VISIBLE_DEVICES`` per side: overlapping steps would otherwise see the same GPUs);
  everything talks over 127.0.0.1.
- **Attached** (``rollout.urls`` set): nothing is launched for rollout; every node trains.
- **CPU** (``gpus_per_node = 0``, the tiny test): the trainer runs ``trainer_procs`` processes per
  node over gloo, each rollout node (or the shared node) runs ``rollout.num_engines`` local engines.

Every refusal is a :class:`TopologyError` naming the numbers that do not fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional


class TopologyError(ValueError):
    """The allocation cannot run this config; the message names the numbers."""


@dataclass
class Plan:
    nodes: List[str]
    gpus_per_node: int
    mode: str
    """split, shared or attached."""
    trainer_nodes: List[str]
    rollout_nodes: List[str]
    procs_per_node: int
    """Trainer processes per trainer node (torchrun --nproc-per-node)."""
    trainer_gpus_per_node: int
    engine_gpus: int
    """GPUs of one engine (rollout.sglang.tp_size x dp_size; 0 on CPU)."""
    engines_per_node: int
    engine_ports: List[int] = field(default_factory=list)
    """Ports of the engines of one rollout node (the same on every node)."""
    engine_bind: str = "0.0.0.0"
    engine_urls: List[str] = field(default_factory=list)
    master_addr: str = ""
    master_port: int = 0
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return len(self.trainer_nodes) * self.procs_per_node

    def gpu_slice(self, role: str) -> Optional[List[int]]:
        """[first, count] of the node's visible GPUs for ``role`` in a shared GPU node, else None."""
        if self.mode != "shared" or not self.gpus_per_node:
            return None
        if role == "trainer":
            return [0, self.trainer_gpus_per_node]
        return [self.trainer_gpus_per_node, self.engines_per_node * self.engine_gpus]

    def engine_host(self, node: str) -> str:
        return "127.0.0.1" if self.mode == "shared" else node

    def to_dict(self) -> dict:
        return asdict(self)


def default_ports(job_id: int, base_port: int, master_port: Optional[int]) -> tuple:
    """Engine base port and rendezvous port: the config's, or spread by job id so that two jobs
    sharing a node (small allocations, the tests) do not collide. Both stay below Linux's
    ephemeral range (32768-60999): srun, torchrun and every client bind ephemeral ports on the
    fly, and one of them can take a port we picked before the engine binds it (seen: EADDRINUSE)."""
    engine = base_port or 20000 + (job_id % 1000) * 8
    master = master_port or 29500 + job_id % 500
    return engine, master


def make_plan(cfg, nodes: List[str], gpus_per_node: int, *, trainer_nodes: Optional[int] = None,
              trainer_gpus: Optional[int] = None, trainer_procs: Optional[int] = None, job_id: int = 0,
              master_port: Optional[int] = None) -> Plan:
    """The plan for ``cfg`` on ``nodes`` with ``gpus_per_node`` GPUs each (0 = CPU)."""
    if not nodes:
        raise TopologyError("the allocation has no nodes")
    r, p = cfg.rollout, cfg.parallel
    n = len(nodes)
    attached = bool(r.urls)
    if attached:
        t, mode = n, "attached"
    else:
        t = trainer_nodes if trainer_nodes is not None else (1 if n == 1 else n // 2)
        if t < 1 or t > n:
            raise TopologyError(f"trainer nodes = {t} but the allocation has {n} node(s)")
        mode = "shared" if t == n else "split"
        if mode == "shared" and n > 1:
            raise TopologyError(f"trainer nodes = {t} = all {n} nodes leaves no rollout node: set fewer "
                                f"trainer nodes, or attach to running engines with rollout.urls")
    tr_nodes, ro_nodes = nodes[:t], ([] if attached else nodes[t:] or nodes[:1])
    engine_gpus = r.sglang.tp_size * r.sglang.dp_size if gpus_per_node else 0
    if gpus_per_node:
        if r.engine != "sglang" and not attached:
            raise TopologyError(f"rollout.engine = {r.engine} on GPU nodes: the GPU launch runs SGLang "
                                f"(rollout.engine = sglang); the local engine is for CPU runs")
        tr_gpus, ro_gpus = _gpu_split(mode, gpus_per_node, trainer_gpus, engine_gpus)
        procs = tr_gpus
        per_node = 0 if attached else ro_gpus // engine_gpus
    else:
        tr_gpus, procs = 0, trainer_procs or 1
        per_node = 0 if attached else r.num_engines
    _check_trainer(cfg, procs, len(tr_nodes), gpus_per_node)
    base, mport = default_ports(job_id, r.base_port, master_port)
    plan = Plan(nodes=list(nodes), gpus_per_node=gpus_per_node, mode=mode, trainer_nodes=tr_nodes,
                rollout_nodes=ro_nodes, procs_per_node=procs, trainer_gpus_per_node=tr_gpus,
                engine_gpus=engine_gpus, engines_per_node=per_node, master_port=mport,
                tp=p.tp, pp=p.pp, cp=p.cp)
    plan.dp = plan.world_size // (p.tp * p.pp * p.cp)
    plan.master_addr = "127.0.0.1" if mode == "shared" else tr_nodes[0]
    if attached:
        plan.engine_urls = list(r.urls)
        return plan
    plan.engine_ports = [base + i for i in range(per_node)]
    plan.engine_bind = "127.0.0.1" if mode == "shared" else "0.0.0.0"
    plan.engine_urls = [f"http://{plan.engine_host(node)}:{port}" for node in ro_nodes for port in plan.engine_ports]
    if mport in plan.engine_ports:
        raise TopologyError(f"rendezvous port {mport} is also an engine port ({plan.engine_ports})")
    return plan


def _gpu_split(mode: str, gpus: int, trainer_gpus: Optional[int], engine_gpus: int) -> tuple:
    """(trainer GPUs per trainer node, engine GPUs per rollout node)."""
    if mode == "attached":
        return gpus, 0
    if mode == "split":
        if gpus % engine_gpus:
            raise TopologyError(f"rollout nodes have {gpus} GPUs, not a multiple of one engine's "
                                f"rollout.sglang.tp_size x dp_size = {engine_gpus} ({gpus % engine_gpus} would idle)")
        return gpus, gpus
    tr = trainer_gpus if trainer_gpus is not None else gpus // 2
    ro = gpus - tr
    if tr < 1 or ro < engine_gpus:
        raise TopologyError(f"one node with {gpus} GPUs: {tr} for the trainer leaves {ro} for engines of "
                            f"rollout.sglang.tp_size x dp_size = {engine_gpus} GPUs")
    if ro % engine_gpus:
        raise TopologyError(f"{ro} rollout GPUs are not a multiple of one engine's {engine_gpus} GPUs")
    return tr, ro


def _check_trainer(cfg, procs: int, nodes: int, gpus_per_node: int) -> None:
    p, m = cfg.parallel, cfg.model
    world = procs * nodes
    mp = p.tp * p.pp * p.cp
    if gpus_per_node and p.tp > procs:
        raise TopologyError(f"parallel.tp = {p.tp} exceeds the {procs} trainer GPUs per node: tensor "
                            f"parallelism must stay inside a node (NVLink)")
    if gpus_per_node and procs % p.tp:
        raise TopologyError(f"{procs} trainer GPUs per node are not a multiple of parallel.tp = {p.tp}")
    if world % mp:
        raise TopologyError(f"{nodes} trainer node(s) x {procs} GPUs/processes = {world} is not divisible by "
                            f"parallel.tp x pp x cp = {p.tp} x {p.pp} x {p.cp} = {mp}")
    if m.num_layers % p.pp:
        raise TopologyError(f"model.num_layers = {m.num_layers} is not divisible by parallel.pp = {p.pp}")
