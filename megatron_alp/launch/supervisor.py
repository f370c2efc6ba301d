"""The process a SLURM batch script becomes (slurm/lib/common.sh execs it): one training job.

    python -m megatron_alp.launch.supervisor --config CFG --gpus-per-node G --trainer-nodes T [overrides]

1. Check the job (plan.check_job: config at the planned world size, topology, memory, paths) and
   stop with the problems before anything starts.
2. Write the job folder ``<run.output_root>/<run.name>/slurm-<job id>/``: ``job.yaml`` (mode 0600:
   includes the experiment config and adds ``rollout.urls`` and the per-job API key, so the key
   never appears on a command line of the trainer), ``plan.json`` (0600) and the engines' logs.
3. Start the rollout engines with one srun step over the rollout nodes (node.py engines); wait
   until every URL answers /health (``rollout.startup_timeout_s``), failing at once if the step
   exits; then the SGLang router if configured.
4. Start the trainer with one srun step over the trainer nodes (node.py trainer: torchrun).
5. Watch: the first component to exit decides. The trainer finishing ends the job 0; the trainer
   failing, or the engines step exiting (with ``bus.on_engine_failure = drop``: every engine gone;
   with ``stop``: any), ends it with a message naming the component and its exit code; the others
   are stopped by their step ids (engines: ``scancel --signal=INT``; trainer: TERM; then scancel).
6. SIGTERM/SIGINT to this process (``#SBATCH --signal=B:TERM@900`` before the time limit, or a
   preemption) is forwarded to the trainer step only, as SIGUSR2 (node.py turns it into SIGTERM for
   the trainer processes, sparing torchrun); the trainer checkpoints at its next step boundary and
   exits. A job-wide SIGTERM (preemption with GraceTime, ``scancel --full``, a drain) reaches every
   step too: torchrun ignores it and the trainer processes checkpoint; the engine agents ignore it
   and keep their servers up. From then on only the trainer's exit counts (an engine stopping is not
   a failure); the engines are stopped after it. The job exits 143, or requeues itself with
   ALP_REQUEUE=1 (the scripts carry ``#SBATCH --requeue``). The next job resumes from ``latest``.

The engine-side model on a resumed run is the bus version of the trainer's latest checkpoint (when
the disk bus still has it), so that attached engines and the resumed trainer agree from the first
sample. Idea of role-split steps in one allocation: NeMo-RL's and slime's SLURM launchers (Ray
there, plain srun steps here).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import warnings
from typing import Dict, List, Optional

from rollout.bus.versions import version_dirname

from . import srun
from .engines_spec import build_engine_spec, engine_start_path, wait_healthy
from .plan import Checked, JobSpec, add_job_args, check_job, render

logger = logging.getLogger("megatron_alp.launch")
TERM_EXIT = 143


class Failure(RuntimeError):
    """A component failed; the message says which and how."""


class Step:
    """One srun step we started: its srun client process and (looked up once) its step id."""

    def __init__(self, name: str, cmd: List[str], job_id: str):
        self.name, self.job_id = name, job_id
        logger.info("starting %s: %s", name, " ".join(cmd))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self._step: Optional[str] = None
        self.ended = False

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def step_id(self) -> Optional[str]:
        if self._step is None and self.poll() is None:
            self._step = srun.find_step(self.job_id, self.name)
        return self._step

    def signal(self, sig: str = "TERM") -> bool:
        step = self.step_id()
        return bool(step) and srun.signal_step(step, sig)

    def stop(self, grace_s: float, sig: str = "TERM") -> None:
        """``sig`` to the step, cancel it after ``grace_s``, and as a last resort end our srun client."""
        if self.poll() is not None:
            return
        logger.info("stopping the %s (step %s)", self.name, self.step_id())
        self.signal(sig)
        if self._wait(grace_s):
            return
        step = self.step_id()
        if step:
            logger.warning("%s did not stop within %.0f s: cancelling step %s", self.name, grace_s, step)
            srun.cancel_step(step)
        if not self._wait(30.0):
            logger.warning("%s: killing its srun client (pid %d)", self.name, self.proc.pid)
            self.proc.kill()
            self.proc.wait()

    def _wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False


class Supervisor:
    def __init__(self, checked: Checked, args: argparse.Namespace, job_id: str, api_key: Optional[str]):
        cfg = checked.cfg
        attached = checked.plan.mode == "attached"  # running engines: their URLs and key are the config's
        self.c, self.args, self.job_id = checked, args, job_id
        self.api_key = cfg.rollout.api_key if attached else api_key
        self.job_dir = os.path.abspath(os.path.join(cfg.run.output_dir, f"slurm-{job_id}"))
        self.steps: Dict[str, Step] = {}
        self.term_at: Optional[float] = None

    # -- job files ---------------------------------------------------------------------------
    def write_files(self, engines: Dict[str, list], router_url: Optional[str]) -> str:
        os.makedirs(self.job_dir, exist_ok=True)
        job_yaml = {"include": [os.path.abspath(self.args.config)]}
        if self.c.plan.mode != "attached":
            rollout = {"urls": self.c.plan.engine_urls}
            if self.api_key:
                rollout["api_key"] = self.api_key
            if router_url:
                rollout["sglang"] = {"router": False, "router_url": router_url}
            job_yaml["rollout"] = rollout
        t = self.c.plan
        plan = {"engines": engines, "engine_gpus": t.gpu_slice("engines"),
                "on_engine_failure": self.c.cfg.bus.on_engine_failure, "trainer": {
            "nodes": t.trainer_nodes, "procs_per_node": t.procs_per_node, "master_addr": t.master_addr,
            "master_port": t.master_port, "gpus": t.gpu_slice("trainer"),
            "args": ["--config", os.path.join(self.job_dir, "job.yaml"), *self.args.overrides]}}
        import yaml

        _write_private(os.path.join(self.job_dir, "job.yaml"), yaml.safe_dump(job_yaml, sort_keys=False))
        path = os.path.join(self.job_dir, "plan.json")
        _write_private(path, json.dumps(plan, indent=1))
        return path

    # -- the job -----------------------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        p, cfg = self.c.plan, self.c.cfg
        try:
            router_url = None
            if cfg.rollout.sglang.router and cfg.rollout.engine == "sglang" and p.mode != "attached":
                router_url = f"http://{p.engine_host(p.rollout_nodes[0])}:{cfg.rollout.sglang.router_port}"
            model_path, version = engine_start_path(cfg)
            python, engine_python = self.args.step_python, self.args.engine_python or self.args.step_python
            if cfg.precision.train == "fp8":  # Transformer Engine and the recipe, on every trainer node
                self._run_step("te-check", p.trainer_nodes,
                               [python, "-m", "megatron_alp.launch.te_check", cfg.precision.fp8_recipe])
            if version == 0 and p.mode != "attached" and cfg.rollout.precision == "fp8":
                # FP8 engines start on a block-FP8 checkpoint: version 0, written before they start.
                self._run_step("v0", p.trainer_nodes[:1], [python, "-m", "megatron_alp.sync.v0", "--config",
                                                           self.args.config, *self.args.overrides])
                model_path = os.path.abspath(os.path.join(cfg.bus.dir, version_dirname(0)))
                logger.info("engines start on bus version 0 (%s)", model_path)
            engines = build_engine_spec(cfg, p, model_path, version, self.api_key, self.job_dir, engine_python)
            plan_path = self.write_files(engines, router_url)
            if p.mode != "attached":
                self._start("engines", p.rollout_nodes,
                            [engine_python, "-m", "megatron_alp.launch.node", "engines", plan_path], None)
                self._wait_healthy("engines", p.engine_urls)
                if router_url:
                    from rollout.engines.sglang import router_command

                    cmd = router_command(cfg.rollout, p.engine_urls, host=p.engine_bind)
                    cmd[0] = engine_python if cmd[0] == sys.executable else cmd[0]
                    self._start("router", p.rollout_nodes[:1], cmd, "none" if p.gpus_per_node else None)
                    self._wait_healthy("router", [router_url])
            else:
                self._wait_healthy("attached engines", p.engine_urls)
            if self.term_at is not None:
                raise Failure("stopped by a signal before the trainer started")
            self._start("trainer", p.trainer_nodes, [python, "-m", "megatron_alp.launch.node", "trainer", plan_path],
                        None)
            return self._watch()
        except Failure as e:
            logger.error("JOB FAILED: %s", e)
            return TERM_EXIT if self.term_at is not None else 1
        finally:
            for name in ("trainer", "router", "engines"):
                if name in self.steps:  # a trainer still running here is failing or stuck
                    self.steps[name].stop(30.0, sig="INT" if name == "engines" else "TERM")
            logger.info("all components stopped; job folder: %s", self.job_dir)

    def _run_step(self, name: str, nodes: List[str], cmd: List[str]) -> None:
        """A preparatory step (trainer launcher, one task per node): wait for it; fail unless it exits 0."""
        self._start(name, nodes, cmd, None)
        step = self.steps.pop(name)
        while step.poll() is None:
            if self.term_at is not None:
                step.stop(30.0)
                raise Failure(f"stopped by a signal during the {name} step")
            time.sleep(1.0)
        if step.poll() != 0:
            raise Failure(f"the {name} step exited with code {step.poll()} (its messages are above)")

    def _start(self, name: str, nodes: List[str], cmd: List[str], gres: Optional[str]) -> None:
        # bus.on_engine_failure = drop: a node's engines failing must not end the other nodes' (node.py).
        kill = name != "engines" or self.c.cfg.bus.on_engine_failure == "stop"
        extra, prefix = srun.step_launcher("trainer" if name == "trainer" else "engine")
        self.steps[name] = Step(name, srun.srun_command(name, nodes, prefix + cmd, gres=gres, extra=extra,
                                                        kill_on_bad_exit=kill), self.job_id)

    def _wait_healthy(self, name: str, urls: List[str]) -> None:
        step = self.steps.get(name)  # None: engines we attach to (not ours to start)
        timeout = self.c.cfg.rollout.startup_timeout_s if step else 60.0

        def alive() -> bool:
            if self.term_at is not None:
                raise Failure(f"stopped by a signal while waiting for the {name}")
            return step is None or step.poll() is None

        missing = wait_healthy(urls, self.api_key, timeout, alive)
        if step is not None and step.poll() is not None:
            raise Failure(f"the {name} step exited with code {step.poll()} before becoming healthy "
                          f"(its messages are above; server logs in {self.job_dir})")
        if missing:
            raise Failure(f"{len(missing)} {name} URL(s) not healthy after {timeout:.0f} s: "
                          f"{', '.join(missing)}; logs in {self.job_dir}")
        logger.info("%s healthy: %s", name, ", ".join(urls))

    def _watch(self) -> int:
        trainer = self.steps["trainer"]
        others = [s for n, s in self.steps.items() if n != "trainer"]
        forwarded = False
        while True:
            if self.term_at is not None and not forwarded:
                forwarded = True
                logger.warning("forwarding SIGTERM to the trainer: it checkpoints at its next step boundary "
                               "(allowed %.0f s, ALP_STOP_GRACE_S)", self.args.stop_grace_s)
                if not trainer.signal("USR2"):
                    logger.error("could not signal the trainer step; it will be cancelled")
            rc = trainer.poll()
            if rc is None and forwarded and time.monotonic() - self.term_at > self.args.stop_grace_s:
                raise Failure(f"the trainer did not stop within {self.args.stop_grace_s:.0f} s of SIGTERM")
            if rc is not None:
                if forwarded or rc == TERM_EXIT:  # TERM_EXIT: a step-wide SIGTERM (preemption) stopped it
                    return self._after_term(rc)
                if rc == 0:
                    logger.info("trainer finished (exit 0)")
                    return 0
                raise Failure(f"the trainer exited with code {rc} (its traceback is above)")
            for s in others if self.term_at is None else []:  # after SIGTERM only the trainer decides
                if s.poll() == 0 and not s.ended:  # its agents exit 0 only after a step-wide SIGTERM
                    s.ended = True
                    logger.warning("the %s step ended after a SIGTERM; waiting for the trainer", s.name)
                elif s.poll() is not None and s.poll() != 0:
                    raise Failure(f"the {s.name} step exited with code {s.poll()} while the trainer was running "
                                  f"(its messages are above; logs in {self.job_dir}); stopping the trainer")
            time.sleep(1.0)

    def _after_term(self, rc: int) -> int:
        logger.warning("trainer stopped after SIGTERM (exit %d); resubmit the same command to resume from "
                       "the latest checkpoint", rc)
        if os.environ.get("ALP_REQUEUE") == "1":
            res = subprocess.run(["scontrol", "requeue", self.job_id], capture_output=True, text=True)
            logger.warning("requeue of job %s: %s", self.job_id, (res.stderr or "ok").strip())
        return TERM_EXIT

    def _on_signal(self, signum, frame) -> None:
        if self.term_at is None:
            logger.warning("signal %d received", signum)
            self.term_at = time.monotonic()


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def job_api_key() -> Optional[str]:
    """ALP_API_KEY, ``none`` for no key, or a fresh random key for this job."""
    key = os.environ.get("ALP_API_KEY", "")
    if key.lower() == "none":
        return None
    return key or secrets.token_urlsafe(24)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_args(p)
    p.add_argument("--stop-grace-s", type=float, default=float(os.environ.get("ALP_STOP_GRACE_S", 600)),
                   help="how long the trainer may take to checkpoint after SIGTERM before its step is cancelled")
    p.add_argument("--step-python", default=os.environ.get("ALP_STEP_PYTHON") or sys.executable,
                   help="Python of the trainer step (default: this one; a container's may differ)")
    p.add_argument("--engine-python", default=os.environ.get("ALP_ENGINE_PYTHON"),
                   help="Python of the engine step and of SGLang unless rollout.sglang.python is set "
                        "(default: the trainer step's)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [alp-launch] %(levelname)s %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its import-time notes are not ours
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")  # expected off GPU nodes
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        logger.error("SLURM_JOB_ID is not set: submit with sbatch (or run the dry run: --dry-run)")
        return 2
    nodes = srun.hostnames(os.environ["SLURM_JOB_NODELIST"])
    api_key = job_api_key()
    spec = JobSpec(a.config, a.overrides, nodes, a.gpus_per_node, a.trainer_nodes, a.trainer_gpus, a.trainer_procs,
                   int(job_id), a.master_port, a.gpu_mem_gb, api_key is not None, not a.no_path_check)
    try:
        checked = check_job(spec)
    except ValueError as e:
        logger.error("JOB REFUSED before starting anything: %s", e)
        return 2
    for line in render(checked).splitlines():
        logger.info("%s", line)
    if not checked.ok:
        logger.error("JOB REFUSED before starting anything: %s", "; ".join(checked.problems))
        return 2
    return Supervisor(checked, a, job_id, api_key).run()


if __name__ == "__main__":
    raise SystemExit(main())
