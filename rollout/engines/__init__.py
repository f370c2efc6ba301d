"""Rollout engines: SGLang servers (launch or attach) and the local CPU engine, one HTTP client.

Submodules: ``protocol`` (the SGLang 0.5.23 request/answer subset), ``client`` (async client),
``processes`` (server processes by pid), ``sglang`` (command lines), ``start`` (engines from the config),
``local`` (the CPU development engine).
"""
