"""The Adapters servicer: admin scope, ids resolved in the caller's tenant, then one AdapterAdmin call."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from peftserve.api import convert, upload
from peftserve.api.adapter_ids import admin_target
from peftserve.api.status import abort
from peftserve.auth import Authenticator, Caller, Scope
from peftserve.engine.protocol import AdapterAdmin
from peftserve.errors import CapacityExceeded
from peftserve_client._proto import peftserve_pb2 as pb
from peftserve_client._proto import peftserve_pb2_grpc as pb_grpc

Request = TypeVar("Request")
Response = TypeVar("Response")
Method = Callable[[Any, Request, Caller], Awaitable[Response]]


def _admin_rpc(method: Method[Request, Response]) -> Callable[..., Awaitable[Response]]:
    """The gRPC handler of method(self, request, caller): every Adapters RPC needs the admin scope."""

    @functools.wraps(method)
    async def handler(self: AdminServicer, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            caller = self.auth.authorize(context.invocation_metadata(), Scope.ADMIN)
            return await method(self, request, caller)
        except Exception as e:
            await abort(context, e)

    return handler


class AdminServicer(pb_grpc.AdaptersServicer):
    """Serves peftserve.v1.Adapters on top of an AdapterAdmin."""

    def __init__(
        self,
        admin: AdapterAdmin,
        auth: Authenticator,
        max_concurrent_uploads: int = upload.MAX_CONCURRENT_UPLOADS,
    ) -> None:
        self.admin = admin
        self.auth = auth
        self.max_concurrent_uploads = max_concurrent_uploads
        self._uploads = 0
        """Uploads being received now (one event loop: a plain counter is enough)."""

    @_admin_rpc
    async def UploadAdapter(
        self, request_iterator: AsyncIterator[pb.UploadAdapterRequest], caller: Caller
    ) -> pb.AdapterManifest:
        """The id is checked before any file is read; the files go to disk as they arrive.

        At most max_concurrent_uploads are received at once (each holds a staged folder on disk until
        it is checked and committed); more are RESOURCE_EXHAUSTED.
        """
        if self._uploads >= self.max_concurrent_uploads:
            raise CapacityExceeded(
                f"{self._uploads} uploads are already in progress (the limit); retry when one finishes"
            )
        self._uploads += 1
        try:
            messages = aiter(request_iterator)
            tenant, name = admin_target(await upload.read_adapter_id(messages), caller)
            manifest = await self.admin.upload(tenant, name, upload.file_chunks(messages))
            return convert.to_manifest_message(manifest)
        finally:
            self._uploads -= 1

    @_admin_rpc
    async def LoadAdapter(self, request: pb.LoadAdapterRequest, caller: Caller) -> pb.AdapterStatus:
        tenant, name = admin_target(request.adapter_id, caller)
        return convert.to_status_message(await self.admin.load(tenant, name, pin=request.pin))

    @_admin_rpc
    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, caller: Caller) -> pb.AdapterStatus:
        tenant, name = admin_target(request.adapter_id, caller)
        return convert.to_status_message(await self.admin.unload(tenant, name))

    @_admin_rpc
    async def DeleteAdapter(
        self, request: pb.DeleteAdapterRequest, caller: Caller
    ) -> pb.DeleteAdapterResponse:
        tenant, name = admin_target(request.adapter_id, caller)
        await self.admin.delete(tenant, name)
        return pb.DeleteAdapterResponse()

    @_admin_rpc
    async def ListAdapters(self, request: pb.ListAdaptersRequest, caller: Caller) -> pb.ListAdaptersResponse:
        tenant = None if caller.local_mode else caller.tenant  # a local caller may use every tenant's
        page, token = await self.admin.list(tenant, convert.page_size(request.page_size), request.page_token)
        return convert.to_list_response(page, token)

    @_admin_rpc
    async def GetAdapter(self, request: pb.GetAdapterRequest, caller: Caller) -> pb.AdapterStatus:
        tenant, name = admin_target(request.adapter_id, caller)
        return convert.to_status_message(await self.admin.get(tenant, name))
