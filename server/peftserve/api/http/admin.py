"""The adapter admin over HTTP (admin scope): the gRPC Adapters service's calls as REST routes.

    POST   /v1/adapters/{id}          upload the PEFT files (multipart or tar) as the next version: 201
    GET    /v1/adapters               the caller's adapters, paginated (?page_size=&page_token=)
    GET    /v1/adapters/{id}          manifest and residency tier
    POST   /v1/adapters/{id}/load     to a device slot ({"pin": true} keeps it there)
    POST   /v1/adapters/{id}/unload   out of device and host memory; the store keeps it
    DELETE /v1/adapters/{id}          every version

{id} is 'name' (the caller's tenant) or 'tenant/name'. Same ids, checks, caps and errors as gRPC.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from peftserve.api import convert
from peftserve.api.adapter_ids import admin_target
from peftserve.api.http.front import HttpFront
from peftserve.api.http.schemas import LoadRequest
from peftserve.api.http.upload import BODY_OVERHEAD_BYTES, upload_chunks
from peftserve.api.upload import MAX_CONCURRENT_UPLOADS
from peftserve.auth import Caller, Scope
from peftserve.engine.protocol import AdapterAdmin, AdapterStatus
from peftserve.errors import CapacityExceeded
from peftserve.store.manifest import AdapterManifest


def manifest_json(manifest: AdapterManifest) -> dict[str, Any]:
    """The fields of the gRPC AdapterManifest message (the dataclass has the same names)."""
    return dataclasses.asdict(manifest)


def status_json(status: AdapterStatus) -> dict[str, Any]:
    """The fields of the gRPC AdapterStatus message."""
    return dataclasses.asdict(status)


def admin_router(front: HttpFront, admin: AdapterAdmin) -> APIRouter:
    """The admin routes over admin; uploads are capped at front.max_upload_bytes."""
    router = APIRouter(prefix="/v1/adapters", tags=["adapters"])
    uploads = 0
    """Uploads being received now (one event loop: a plain counter is enough), as the gRPC servicer."""

    def caller(request: Request) -> Caller:
        return front.caller(request.headers, Scope.ADMIN)

    @router.get("")
    @router.get("/", include_in_schema=False)
    async def list_adapters(request: Request, page_size: int = 0, page_token: str = "") -> dict[str, Any]:
        who = caller(request)
        tenant = None if who.local_mode else who.tenant  # a local caller may use every tenant's
        page, token = await admin.list(tenant, convert.page_size(page_size), page_token)
        return {"object": "list", "data": [status_json(s) for s in page], "next_page_token": token}

    # /load and /unload first: {adapter_id:path} would swallow them otherwise.
    @router.post("/{adapter_id:path}/load")
    async def load(adapter_id: str, request: Request, body: LoadRequest | None = None) -> dict[str, Any]:
        tenant, name = admin_target(adapter_id, caller(request))
        return status_json(await admin.load(tenant, name, pin=body.pin if body else False))

    @router.post("/{adapter_id:path}/unload")
    async def unload(adapter_id: str, request: Request) -> dict[str, Any]:
        tenant, name = admin_target(adapter_id, caller(request))
        return status_json(await admin.unload(tenant, name))

    @router.get("/{adapter_id:path}")
    async def get(adapter_id: str, request: Request) -> dict[str, Any]:
        tenant, name = admin_target(adapter_id, caller(request))
        return status_json(await admin.get(tenant, name))

    @router.delete("/{adapter_id:path}")
    async def delete(adapter_id: str, request: Request) -> dict[str, Any]:
        tenant, name = admin_target(adapter_id, caller(request))
        await admin.delete(tenant, name)
        return {"adapter_id": f"{tenant}/{name}", "deleted": True}

    @router.post(
        "/{adapter_id:path}", status_code=201, max_body_size=front.max_upload_bytes + BODY_OVERHEAD_BYTES
    )
    async def upload(adapter_id: str, request: Request) -> JSONResponse:
        """The id and the caller are checked before the body is read; the files go to disk as they arrive."""
        nonlocal uploads
        tenant, name = admin_target(adapter_id, caller(request))
        if uploads >= MAX_CONCURRENT_UPLOADS:
            raise CapacityExceeded(
                f"{uploads} uploads are already in progress (the limit); retry when one finishes"
            )
        uploads += 1
        try:
            manifest = await admin.upload(tenant, name, upload_chunks(request, front.max_upload_bytes))
        finally:
            uploads -= 1
        return JSONResponse(manifest_json(manifest), status_code=201)

    return router
