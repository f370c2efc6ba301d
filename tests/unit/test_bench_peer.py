"""bench/peer: the TRL side mirrors the demo config, and without TRL the benchmark says why it skips."""

from __future__ import annotations

import sys

from bench import peer


def test_trl_side_reads_the_demo_settings_from_its_config():
    s = peer._demo_settings()
    # configs/experiments/demo_tiny_cpu.yaml: 16 prompts x 8 samples, 4 updates, 6 new tokens; 2 processes
    assert (s["prompts"], s["samples"], s["updates"], s["new_tokens"], s["nproc"]) == (16, 8, 4, 6, 2)
    assert s["lr"] == 3.0e-4 and s["clip"] == 1.0 and s["temperature"] == 1.0


def test_without_trl_the_reason_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # what an absent package looks like to import
    why = peer.trl_missing()
    assert "TRL is not importable" in why and "megatron-alp[bench]" in why
