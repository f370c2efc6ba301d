"""`make bench`: every benchmark in turn, each printing its ratio against its in-run baseline.

    python -m bench.run_all [--only alp_overhead,logprob]
"""

from __future__ import annotations

import argparse
import importlib
import time

BENCHES = ("alp_overhead", "logprob", "rollout", "prefix_cache", "convert", "bus", "step")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset")
    args = p.parse_args(argv)
    for name in [n for n in args.only.split(",") if n]:
        if name not in BENCHES:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES)}")
        print(f"\n=== bench.{name} ===", flush=True)
        t0 = time.time()
        importlib.import_module(f"bench.{name}").main([])
        print(f"=== bench.{name}: {time.time() - t0:.0f} s ===", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
