"""What the launcher checks before anything starts: the config (with the trainer's own
``load_and_check`` at the planned world size), the memory estimate, and the paths the job needs.

A GPU config is usually planned on a CPU login node. There the trainer would refuse bf16/fp8
training (it needs CUDA), so the config is checked with ``precision.train=fp32`` and the memory
estimate uses the requested precision; the trainer repeats the real check on the GPU nodes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple

from ..config.loader import apply_overrides, load_yaml_tree

NODE_LOCAL = ("/tmp", "/dev/shm", "/var/tmp", "/run")
"""Prefixes of filesystems that are private to a node (the bus and run directory must be shared)."""


@contextmanager
def _world_size(world: int) -> Iterator[None]:
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = old


def requested_precision(config_path: Optional[str], overrides: Sequence[str]) -> str:
    """``precision.train`` as the files and overrides ask for it, before any validation."""
    tree = apply_overrides(load_yaml_tree(config_path) if config_path else {}, overrides)
    return str((tree.get("precision") or {}).get("train", "fp32"))


def torch_here() -> bool:
    """Whether torch imports on this host (a container job's batch host may not have it)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def load_for_world(config_path: Optional[str], overrides: Sequence[str], world: int, on_gpus: bool):
    """The trainer's ``load_and_check`` at world size ``world``; returns (cfg, note or None).

    Without torch on this host (the batch host of a container job: torch and Megatron live in the
    steps' image) only the config's own checks run here; the trainer repeats the full check."""
    if not torch_here():
        from ..config import load_config

        with _world_size(world):
            cfg = load_config(config_path, list(overrides))
        return cfg, ("torch is not importable on this host (a container job?): the config's own checks ran "
                     "here; the batch split and precision are checked by the trainer on its nodes")
    import torch

    from ..trainer.config_check import load_and_check

    overrides = list(overrides)
    note = None
    wanted = requested_precision(config_path, overrides)
    if on_gpus and wanted != "fp32" and not torch.cuda.is_available():
        overrides.append("precision.train=fp32")
        note = (f"precision.train = {wanted} is checked on the GPU nodes by the trainer itself "
                f"(this machine has no CUDA); the memory estimate uses {wanted}")
    with _world_size(world):
        cfg = load_and_check(config_path, overrides)
    return cfg, note


def check_sequence_fits(cfg) -> List[str]:
    from .memory import max_sequence_len

    longest = max_sequence_len(cfg)
    if longest > cfg.model.max_position_embeddings:
        r = cfg.rollout
        budget = "rollout.multi_turn.max_response_len" if r.multi_turn.enabled else "rollout.max_new_tokens"
        return [f"rollout.data.max_prompt_len + {budget} = {longest} tokens exceeds "
                f"model.max_position_embeddings = {cfg.model.max_position_embeddings}"]
    return []


def _creatable(path: str) -> bool:
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return False
        probe = parent
    return os.path.isdir(probe) and os.access(probe, os.W_OK)


def _hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~"))


def check_paths(cfg, multi_node: bool) -> Tuple[List[str], List[str]]:
    """(problems, warnings) about the paths of ``cfg``; relative paths are relative to the cwd."""
    problems: List[str] = []
    warnings: List[str] = []
    m, r = cfg.model, cfg.rollout
    for key, path in (("model.hf_path", m.hf_path), ("rollout.model_path", r.model_path)):
        if not path:
            continue
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                problems.append(f"{key} = {path} has no config.json (not an HF checkpoint)")
        elif _hub_id(path):
            warnings.append(f"{key} = {path} is not a directory: it will be read from the HF hub cache "
                            f"(HF_HOME) on every node; a shared local copy is safer")
        else:
            problems.append(f"{key} = {path} does not exist")
    if cfg.checkpoint.load and not os.path.exists(cfg.checkpoint.load):
        problems.append(f"checkpoint.load = {cfg.checkpoint.load} does not exist "
                        f"(convert the HF model first: tools/convert.py hf-to-mcore)")
    if r.data.path and not os.path.isfile(r.data.path):
        problems.append(f"rollout.data.path = {r.data.path} does not exist")
    shared = [("run.output_root", cfg.run.output_root)]
    if cfg.bus.backend == "disk":
        shared.append(("bus.dir", cfg.bus.dir))
    if cfg.checkpoint.dir:
        shared.append(("checkpoint.dir", cfg.checkpoint.dir))
    for key, path in shared:
        if not _creatable(path):
            problems.append(f"{key} = {path} cannot be created (no writable parent directory)")
        elif multi_node and os.path.abspath(path).startswith(NODE_LOCAL):
            problems.append(f"{key} = {path} is node-local storage: every node of the job must see it "
                            f"(use a shared filesystem)")
    return problems, warnings


# The chat template's end-of-turn token of the families whose tokenizer may be absent on a login
# node (HF tokenizer files: Qwen2/2.5/3 `<|im_end|>`, Llama-3 instruct `<|eot_id|>`).
END_OF_TURN_IDS = {"qwen2": ("<|im_end|>", 151645), "qwen3": ("<|im_end|>", 151645), "llama": ("<|eot_id|>", 128009)}


def _local_tokenizer(cfg):
    path = cfg.model.hf_path or cfg.rollout.model_path
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - no local copy: fall back to the table
        return None


def model_eos_ids(cfg) -> List[int]:
    """EOS ids the checkpoint itself declares (config.json / generation_config.json of a local copy)."""
    import json

    path, ids = cfg.model.hf_path or cfg.rollout.model_path, []
    for name in ("config.json", "generation_config.json"):
        try:
            with open(os.path.join(path or "", name)) as f:
                eos = json.load(f).get("eos_token_id")
        except (OSError, ValueError):
            continue
        ids += eos if isinstance(eos, list) else ([] if eos is None else [eos])
    return ids


def end_of_turn(cfg) -> Optional[Tuple[str, int]]:
    """(token, id) that ends an assistant turn in the chat template, or None when unknown."""
    from rollout.chat import end_of_turn_token

    tok = _local_tokenizer(cfg)
    name = end_of_turn_token(tok) if tok is not None else None
    if name is not None:
        return name, tok.convert_tokens_to_ids(name)
    # no local tokenizer, or one without a chat template (a model directory with only config.json)
    if cfg.model.vocab_size >= 100000:  # a real model of a known family (tiny test models have a tokenizer)
        return END_OF_TURN_IDS.get(cfg.model.family)
    return None


def check_rollout_inputs(cfg) -> Tuple[List[str], List[str]]:
    """(problems, warnings): the dataset has every record's prompt and label; the stop set ends turns."""
    from rollout.data import get_field, read_records

    problems: List[str] = []
    warnings: List[str] = []
    d = cfg.rollout.data
    if d.path and os.path.isfile(d.path):
        try:
            records = read_records(d.path)
        except Exception as e:  # noqa: BLE001 - reported as a problem
            records = []
            problems.append(f"rollout.data.path = {d.path} cannot be read: {e}")
        for key, name, needed in ((d.prompt_key, "prompt_key", True), (d.label_key, "label_key", d.require_label)):
            missing = sum(get_field(r, key, None) is None for r in records)
            if missing and needed:
                problems.append(f"rollout.data.{name} = {key}: {missing} of {len(records)} records of {d.path} lack "
                                f"it (verl files: label_key=reward_model.ground_truth; tools/convert_data.py)")
    if d.apply_chat_template:
        eot = end_of_turn(cfg)
        if eot is None:
            warnings.append("the chat template's end-of-turn token is unknown here (no local tokenizer): "
                            "rollout.stop_token_ids is not checked")
        elif eot[1] not in [*cfg.rollout.stop_token_ids, *model_eos_ids(cfg)]:
            problems.append(f"rollout.stop_token_ids = {list(cfg.rollout.stop_token_ids)} lacks the chat template's "
                            f"end-of-turn token {eot[0]} ({eot[1]}): base models that declare another EOS would "
                            f"generate past the turn (set it in the model preset)")
    return problems, warnings
