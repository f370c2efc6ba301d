"""`make bench`: every benchmark in turn, each printing its ratio against its in-run baseline.

    python -m bench.run_all [--only alp_overhead,logprob]

Each benchmark runs in its own process: none inherits another's process group, environment
(an in-process gloo group sets WORLD_SIZE) or memory high-water mark.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = ("alp_overhead", "logprob", "rollout", "rollout_demo", "prefix_cache", "convert", "bus", "step", "step_async",
           "pack", "peer")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset")
    args = p.parse_args(argv)
    failed = []
    for name in [n for n in args.only.split(",") if n]:
        if name not in BENCHES:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES)}")
        print(f"\n=== bench.{name} ===", flush=True)
        t0 = time.time()
        rc = subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=REPO).returncode
        print(f"=== bench.{name}: {time.time() - t0:.0f} s{'' if rc == 0 else f', FAILED (exit {rc})'} ===", flush=True)
        failed += [name] if rc else []
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
