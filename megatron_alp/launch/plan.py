"""The dry run: validate a SLURM job without GPUs and print its plan.

    python -m megatron_alp.launch.plan --config configs/experiments/train_7b_alp.yaml \
        --nodes 4 --gpus-per-node 8 --trainer-nodes 2 [section.key=value ...]

(``bash slurm/train_7b_alp.sh --dry-run`` calls it with the script's own #SBATCH numbers.) It checks
the config with the trainer's ``load_and_check`` at the planned world size, the topology (GPUs per
node against TP x PP x CP x DP and the engine TP), the memory estimate of both sides against the
GPU memory, and the paths the job reads and writes; it exits 0 when the job can start, 1 when a
check failed (each problem named), 2 when the config or topology is refused outright. The
supervisor runs the same :func:`check_job` at the start of every job.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import List, Optional

from ..runtime.command_output import command_logger
from .memory import EngineMemory, TrainerMemory, estimate_engine, estimate_trainer, model_params
from .topology import Plan, make_plan

HEADROOM = 0.9
"""Fraction of GPU memory the trainer estimate may use (fragmentation, the estimate's roughness)."""


@dataclass
class JobSpec:
    config: Optional[str]
    overrides: List[str]
    nodes: List[str]
    gpus_per_node: int = 0
    trainer_nodes: Optional[int] = None
    trainer_gpus: Optional[int] = None
    trainer_procs: Optional[int] = None
    job_id: int = 0
    master_port: Optional[int] = None
    gpu_mem_gb: float = 80.0
    use_api_key: bool = True
    check_paths: bool = True


@dataclass
class Checked:
    cfg: object
    plan: Plan
    trainer_mem: TrainerMemory
    engine_mem: Optional[EngineMemory]
    problems: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_job(spec: JobSpec) -> Checked:
    """Everything the dry run checks; raises ``ValueError`` (config) or ``TopologyError``."""
    from ..config import load_config
    from .checks import check_paths, check_rollout_inputs, check_sequence_fits, load_for_world, requested_precision

    on_gpus = spec.gpus_per_node > 0
    # The topology first (it fixes the world size), from the config without the batch checks; the
    # precision does not matter here (fp8's own check needs CUDA: load_for_world handles it below).
    draft = load_config(spec.config, [*spec.overrides, "precision.train=fp32"])
    plan = make_plan(draft, spec.nodes, spec.gpus_per_node, trainer_nodes=spec.trainer_nodes,
                     trainer_gpus=spec.trainer_gpus, trainer_procs=spec.trainer_procs, job_id=spec.job_id,
                     master_port=spec.master_port)
    cfg, note = load_for_world(spec.config, spec.overrides, plan.world_size, on_gpus)
    precision = requested_precision(spec.config, spec.overrides)
    out = Checked(cfg, plan, estimate_trainer(cfg, plan.dp, precision=precision), None)
    if note:
        out.notes.append(note)
    out.problems += check_sequence_fits(cfg)
    r = cfg.rollout
    if plan.engine_urls and plan.mode != "attached" and on_gpus:
        out.engine_mem = estimate_engine(cfg, model_params(cfg.model), spec.gpu_mem_gb)
        if r.precision == "fp8":
            out.notes.append(f"FP8 rollout: a step on {plan.trainer_nodes[0]} writes bus version 0 (block FP8) from "
                             f"{cfg.model.hf_path} into {cfg.bus.dir} before the engines start on it "
                             f"(megatron_alp/sync/v0.py)")
        if r.sglang.router and spec.use_api_key:
            out.problems.append("rollout.sglang.router with the job's API key: the router does not forward it "
                                "(see rollout/config.py); leave the router off (the trainer's fleet balances "
                                "the engines itself) or run without a key on a private network (ALP_API_KEY=none)")
    if on_gpus and precision == "fp8":
        from .te_check import CHECKS

        recipe = cfg.precision.fp8_recipe
        if recipe not in CHECKS:
            out.problems.append(f"precision.fp8_recipe = {recipe}: not a Transformer Engine recipe {sorted(CHECKS)}")
        else:
            out.notes.append(f"FP8 training ({recipe} recipe): each trainer node checks that Transformer Engine "
                             f"imports and supports it before anything starts (launch/te_check.py)")
    if on_gpus:
        usable = HEADROOM * spec.gpu_mem_gb
        total = out.trainer_mem.total_gb
        if total > usable:
            out.problems.append(
                f"trainer memory estimate {total:.1f} GB per GPU exceeds {usable:.1f} GB usable "
                f"({HEADROOM:.0%} of {spec.gpu_mem_gb:g} GB): raise parallel.tp or parallel.pp, set "
                f"parallel.recompute = full, or lower run.micro_batch_size")
        em = out.engine_mem
        if em is not None and em.weights_gb >= em.budget_gb:
            out.problems.append(f"engine weights {em.weights_gb:.1f} GB per GPU do not fit the static budget "
                                f"{em.budget_gb:.1f} GB: raise rollout.sglang.tp_size")
        elif em is not None and em.kv_tokens < em.sequence_len:
            out.problems.append(f"engine KV cache holds {em.kv_tokens} tokens, less than one {em.sequence_len}-"
                                f"token sequence: raise rollout.sglang.tp_size or mem_fraction_static")
    if spec.check_paths:
        problems, warnings = check_paths(cfg, multi_node=len(spec.nodes) > 1)
        out.problems += problems
        out.warnings += warnings
        problems, warnings = check_rollout_inputs(cfg)
        out.problems += problems
        out.warnings += warnings
    return out


def render(c: Checked) -> str:
    p, cfg = c.plan, c.cfg
    unit = "GPUs" if p.gpus_per_node else "processes"
    lines = [f"plan: {len(p.nodes)} node(s) x {p.gpus_per_node} GPUs, mode {p.mode}",
             f"  trainer  {len(p.trainer_nodes)} node(s) {','.join(p.trainer_nodes)}: {p.procs_per_node} {unit} "
             f"per node, world {p.world_size} = TP {p.tp} x PP {p.pp} x CP {p.cp} x DP {p.dp}"
             f"{' + SP' if cfg.parallel.sequence_parallel else ''}, recompute {cfg.parallel.recompute}",
             f"           rendezvous {p.master_addr}:{p.master_port}"]
    if p.mode == "attached":
        lines.append(f"  rollout  attached to {len(p.engine_urls)} running engine(s): {', '.join(p.engine_urls)}")
    else:
        gpus = f", {p.engine_gpus} GPUs each (TP {cfg.rollout.sglang.tp_size} x DP {cfg.rollout.sglang.dp_size})" \
            if p.gpus_per_node else ""
        lines.append(f"  rollout  {len(p.rollout_nodes)} node(s) {','.join(p.rollout_nodes)}: "
                     f"{p.engines_per_node} {cfg.rollout.engine} engine(s) per node{gpus}, "
                     f"{len(p.engine_urls)} in all, ports {p.engine_ports}")
    r, run = cfg.rollout, cfg.run
    lines.append(f"  batch    {run.prompts_per_step} prompts x {r.n_samples} samples, "
                 f"{run.mini_batches_per_step} optimizer steps per rollout, micro-batch {run.micro_batch_size}, "
                 f"max_staleness {r.max_staleness}{f' ({r.span_policy})' if r.max_staleness else ' (synchronous)'}")
    lines.append("trainer memory per GPU (estimate; docs/slurm.md):" if p.gpus_per_node else
                 "trainer memory per process (estimate; a CPU job: not checked):")
    lines += ["  " + s for s in c.trainer_mem.lines()]
    if c.engine_mem is not None:
        lines.append("engine memory per GPU (estimate):")
        lines += ["  " + s for s in c.engine_mem.lines()]
    lines += [f"note: {n}" for n in c.notes]
    lines += [f"warning: {w}" for w in c.warnings]
    lines += [f"PROBLEM: {q}" for q in c.problems]
    lines.append("dry run OK: the job can start" if c.ok else f"dry run FAILED: {len(c.problems)} problem(s)")
    return "\n".join(lines)


def add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0 = CPU job)")
    p.add_argument("--trainer-nodes", type=int, default=None, help="nodes for the trainer (the rest roll out)")
    p.add_argument("--trainer-gpus", type=int, default=None, help="one-node job: GPUs for the trainer")
    p.add_argument("--trainer-procs", type=int, default=None, help="CPU job: trainer processes per node")
    p.add_argument("--master-port", type=int, default=None, help="torchrun rendezvous port")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one GPU for the estimates")
    p.add_argument("--no-api-key", action="store_true", help="the engines run without an API key")
    p.add_argument("--no-path-check", action="store_true", help="skip the checks of model/data/output paths")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (as for the trainer)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (names node0, node1, ...)")
    p.add_argument("--nodelist", default=None, help="comma-separated node names (instead of --nodes)")
    p.add_argument("--job-id", type=int, default=0)
    add_job_args(p)
    a = p.parse_args(argv)
    nodes = a.nodelist.split(",") if a.nodelist else [f"node{i}" for i in range(a.nodes)]
    spec = JobSpec(a.config, a.overrides, nodes, a.gpus_per_node, a.trainer_nodes, a.trainer_gpus,
                   a.trainer_procs, a.job_id, a.master_port, a.gpu_mem_gb, not a.no_api_key, not a.no_path_check)
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = command_logger("plan")  # the report on stdout, a refusal on stderr
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")  # expected on a login node
    try:
        checked = check_job(spec)
    except ValueError as e:  # ConfigError and TopologyError are ValueErrors
        out.error("dry run REFUSED: %s", e)
        return 2
    out.info("%s", render(checked))
    return 0 if checked.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
