"""Weight updates of the local engine: disk (checked against the bus manifest) and distributed.

``/update_weights_from_disk`` on a bus version directory verifies every tensor's checksum against
``bus-manifest.json`` (with the algorithm the manifest names: xxh3_128 by default, sha256 for
``bus.checksum = sha256`` and older manifests) and refuses a version older than the one the engine
runs; a failed apply keeps the old weights (everything is checked before the first copy).

The distributed path implements SGLang 0.5.23's endpoints over gloo, so the trainer side of the
``nccl`` bus backend runs end to end on CPU: ``/init_weights_update_group`` joins a group (the
engine is one rank, ``rank_offset``), ``/begin_weight_update`` opens a session,
``/update_weights_from_distributed`` receives one broadcast (flattened bucket or one tensor at a
time), ``/end_weight_update`` applies everything the session received at once. Unlike SGLang (which
loads each bucket as it arrives), a session that fails leaves the old weights untouched. A
received bucket with unknown names or wrong shapes is still consumed, so the group stays in step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any, Dict, Optional

import torch
from aiohttp import web

from ...bus.disk import looks_like_version_dir
from ...bus.distributed import FLATTENED, UpdateGroup, join_update_group, unflatten_bucket
from ...bus.manifest import BusError, has_manifest, read_manifest, to_dtype
from ...bus.versions import is_older
from .server import _json

logger = logging.getLogger(__name__)

# SGLang 0.5.23 WeightUpdater.flush_cache_after_weight_update: the update call fails (400) when
# its flush is refused, although the weights were loaded.
NOT_FLUSHED = ("Weights were updated, but the cache was not flushed because requests are still running or queued. "
               "Retract or finish them, then call /flush_cache.")


def _fail(message: str, status: int = 400, **extra) -> web.Response:
    logger.error(message)
    return web.json_response({"success": False, "message": message, **extra}, status=status)


class WeightSync:
    """Per-engine state: weight-update groups and the open session's received tensors."""

    def __init__(self, engine):
        self.engine = engine
        self.groups: Dict[str, UpdateGroup] = {}
        self.session: Optional[Dict[str, torch.Tensor]] = None
        self.session_version: Optional[str] = None
        self.session_flush = False  # a bucket asked for flush_cache: flush when the session applies
        self._lock = threading.Lock()  # one receive at a time per engine

    # -- disk --------------------------------------------------------------------------------
    async def update_from_disk(self, body: Dict[str, Any]) -> web.Response:
        engine = self.engine
        path = body.get("model_path")
        if not isinstance(path, str) or not os.path.isdir(path):
            return _fail(f"model_path {path!r} is not a directory", num_paused_requests=0)
        if body.get("load_format") not in (None, "auto", "safetensors"):
            return _fail(f"load_format {body['load_format']!r} is not supported", num_paused_requests=0)
        version = body.get("weight_version")
        if has_manifest(path):
            try:
                bus_version = str(read_manifest(path).version)
            except BusError as e:
                return _fail(str(e), num_paused_requests=0)
            if version is not None and str(version) != bus_version:
                return _fail(f"weight_version {version} does not match {path} (bus version {bus_version})",
                             num_paused_requests=0)
            version = bus_version
        if has_manifest(path) and is_older(version, engine.weight_version):
            return _fail(f"refusing version {version}: older than the running version {engine.weight_version}",
                         num_paused_requests=0)
        if not has_manifest(path) and looks_like_version_dir(path):
            return _fail(f"{path} is named as a bus version but has no bus-manifest.json (unpublished or damaged): "
                         f"refused", num_paused_requests=0)
        if body.get("abort_all_requests"):
            engine.scheduler.abort(abort_all=True)
        flush = body.get("flush_cache", True) is not False

        def load():
            n = engine.model.load_weights_from_dir(path, complete=True)
            return n, (engine.scheduler.flush_cache(ignore_waiting=True) if flush else True)

        try:
            n, flushed = await asyncio.to_thread(engine.scheduler.exclusive, load)
        except Exception as e:
            return _fail(f"update_weights_from_disk({path}) failed, old weights kept: {type(e).__name__}: {e}",
                         num_paused_requests=0)
        if not flushed:  # loaded, but neither the version nor model_path moves (SGLang: success=False)
            return _fail(NOT_FLUSHED, num_paused_requests=0)
        message = f"Succeeded to update model weights ({n} tensors from {path})."
        engine.model.model_path = path  # SGLang's _update_model_path_info
        engine.info["served_model_name"] = path
        if version is not None:
            engine.weight_version = str(version)
            message += f" Weight version updated to {engine.weight_version}."
        logger.info(message)
        return web.json_response({"success": True, "message": message, "num_paused_requests": 0})

    # -- distributed -------------------------------------------------------------------------
    async def init_group(self, body: Dict[str, Any]) -> web.Response:
        try:
            name = str(body.get("group_name", "weight_update_group"))
            if name in self.groups:
                return _fail(f"group {name!r} exists; destroy it first")
            group = await asyncio.to_thread(
                join_update_group, str(body["master_address"]), int(body["master_port"]), int(body["rank_offset"]),
                int(body["world_size"]), name, str(body.get("backend", "gloo")), float(body.get("timeout_s", 600)))
        except Exception as e:
            return _fail(f"Failed to initialize custom process group: {type(e).__name__}: {e}.")
        self.groups[name] = group
        return web.json_response({"success": True, "message": "Succeeded to initialize custom process group."})

    async def destroy_group(self, body: Dict[str, Any]) -> web.Response:
        group = self.groups.pop(str(body.get("group_name", "weight_update_group")), None)
        if group is None:
            return _fail("The group to be destroyed does not exist.")
        await asyncio.to_thread(group.close)
        return web.json_response({"success": True, "message": "Succeeded to destroy custom process group."})

    async def begin(self, body: Dict[str, Any]) -> web.Response:
        if self.session is not None:
            return _fail("a weight-update session is already open; call end_weight_update() first")
        self.session, self.session_version, self.session_flush = {}, None, False
        return web.json_response({"success": True, "message": "Success"})

    def _receive(self, group: UpdateGroup, body: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        with self._lock:
            if body.get("load_format") == FLATTENED:
                size = sum(int(torch.Size(s).numel()) * to_dtype(d).itemsize
                           for d, s in zip(dtypes, shapes, strict=True))
                flat = torch.empty(size, dtype=torch.uint8)
                group.broadcast(flat)
                return {n: t.clone() for n, t in unflatten_bucket(flat, names, dtypes, shapes)}
            out = {}
            for name, dt, shape in zip(names, dtypes, shapes, strict=True):
                t = torch.empty(shape, dtype=to_dtype(dt))
                group.broadcast(t)
                out[name] = t
            return out

    async def update_from_distributed(self, body: Dict[str, Any]) -> web.Response:
        name = str(body.get("group_name", "weight_update_group"))
        group = self.groups.get(name)
        if group is None:
            return _fail(f"Group {name} not in {sorted(self.groups)}. Please call `init_weights_update_group` first.")
        try:
            received = await asyncio.to_thread(self._receive, group, body)
        except Exception as e:
            return _fail(f"Failed to receive weights: {type(e).__name__}: {e}")
        if self.session is None:  # consumed, so the group stays in step, but not applied
            return _fail("update_weights_from_distributed must run between begin_weight_update() and "
                         "end_weight_update()")
        params = self.engine.model.model.state_dict()
        for n, t in received.items():
            base = n[: -len("_scale_inv")] if n.endswith("_scale_inv") else n
            if base not in params:
                return _fail(f"Failed to update parameter online: unknown tensor {n!r}")
            if not n.endswith("_scale_inv") and tuple(t.shape) != tuple(params[n].shape):
                return _fail(f"Failed to update parameter online: {n} has shape {tuple(t.shape)}, "
                             f"the model {tuple(params[n].shape)}")
        self.session.update(received)
        if body.get("weight_version") is not None:
            self.session_version = str(body["weight_version"])
        if body.get("flush_cache", True) is not False:
            self.session_flush = True
            if not await asyncio.to_thread(self.engine.scheduler.can_flush, True):
                return _fail(NOT_FLUSHED)
        return web.json_response({"success": True, "message": "Succeeded to update parameter online."})

    async def end(self, body: Dict[str, Any]) -> web.Response:
        if self.session is None:
            return _fail("no weight-update session is open; call begin_weight_update() first")
        staged, version, flush = self.session, self.session_version, self.session_flush
        self.session = self.session_version = None
        if staged:
            model, sched = self.engine.model, self.engine.scheduler

            def apply():  # SGLang loads and flushes per bucket; we apply the whole session at once
                model.load_tensors(staged)
                if flush:
                    sched.flush_cache(ignore_waiting=True)

            try:
                await asyncio.to_thread(sched.exclusive, apply)
            except Exception as e:
                return _fail(f"end_weight_update: applying {len(staged)} tensors failed, old weights kept: "
                             f"{type(e).__name__}: {e}")
            if version is not None:
                self.engine.weight_version = version
            logger.info("applied %d tensors received over weight-update groups", len(staged))
        return web.json_response({"success": True, "message": "Success"})

    async def get_weights_by_name(self, body: Dict[str, Any]) -> web.Response:
        """SGLang (models/llama.py get_weights_by_name): the fp32 values as nested lists, truncated to
        the first ``truncate_size`` entries of the first dimension; an unknown name is a 400."""
        try:
            t = self.engine.model.get_weight(str(body["name"]))
        except KeyError:
            return web.json_response({"error": {"message": "Get parameter by name failed"}}, status=400)
        values = t.float().tolist()
        if isinstance(values, list):
            values = values[: int(body.get("truncate_size", 100))]
        return web.json_response(values)


def add_routes(app: web.Application, get_sync) -> None:
    """Register the weight endpoints; ``get_sync(request)`` returns the engine's :class:`WeightSync`."""
    def route(method_name: str):
        async def handler(request: web.Request) -> web.Response:
            return await getattr(get_sync(request), method_name)(await _json(request))
        return handler

    r = app.router
    r.add_post("/update_weights_from_disk", route("update_from_disk"))
    r.add_post("/init_weights_update_group", route("init_group"))
    r.add_post("/destroy_weights_update_group", route("destroy_group"))
    r.add_post("/begin_weight_update", route("begin"))
    r.add_post("/end_weight_update", route("end"))
    r.add_post("/update_weights_from_distributed", route("update_from_distributed"))
    r.add_route("*", "/get_weights_by_name", route("get_weights_by_name"))
