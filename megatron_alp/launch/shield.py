"""Run a Python server module with SIGTERM ignored for good (the engine agent's servers):

    python -m megatron_alp.launch.shield -m MODULE [args]     # as `python -m MODULE [args]`

A job-wide SIGTERM (preemption with GraceTime, ``scancel --signal=TERM <job>``) reaches every
process of every step; a rollout server must keep serving until the trainer has finished its step
and checkpointed. Both HTTP stacks in use install their own SIGTERM handler (SGLang's uvicorn with
``signal.signal``; aiohttp's ``run_app``, the local engine, through the event loop's
``add_signal_handler``, which calls ``signal.signal`` too), so an inherited SIG_IGN is not enough:
before the module is imported, ``signal.signal`` is wrapped so that SIGTERM stays ignored, and the
SIG_IGN is inherited by the server's own child processes. The agent (launch/node.py) stops its
servers with SIGINT, which they still handle, then SIGKILL.
"""

from __future__ import annotations

import runpy
import signal
import sys

_real_signal = signal.signal


def _guarded(signum, handler):
    if signum == signal.SIGTERM:
        return signal.SIG_IGN  # the handler is not installed: SIGTERM stays ignored
    return _real_signal(signum, handler)


def install() -> None:
    _real_signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal = _guarded


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] != "-m":
        raise SystemExit("usage: python -m megatron_alp.launch.shield -m MODULE [args]")
    install()
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
