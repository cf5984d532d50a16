"""asyncio client of the peftserve gRPC API (grpc.aio); same methods as Client, awaited."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from peftserve_client import _core
from peftserve_client._proto import peftserve_pb2 as pb
from peftserve_client._proto import peftserve_pb2_grpc as pb_grpc
from peftserve_client.errors import from_rpc_error
from peftserve_client.types import (
    AdapterManifest,
    AdapterPage,
    AdapterStatus,
    GenerateResult,
    ModelInfo,
    StreamChunk,
    TokenizeResult,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

Response = TypeVar("Response")


class AsyncClient:
    """Talks to one peftserve server from asyncio; use `async with` or await close()."""

    def __init__(
        self,
        address: str,
        timeout: float | None = None,
        api_key: str | None = None,
        *,
        tls: bool = False,
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
    ) -> None:
        """TLS is on with tls=True or any file: ca_file is the CA of the server's certificate (default:
        the system's roots); cert_file and key_file are this client's certificate for mutual TLS."""
        credentials = _core.channel_credentials(tls, ca_file, cert_file, key_file)
        if credentials is not None:
            self._channel = grpc.aio.secure_channel(address, credentials)
        else:
            self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._admin = pb_grpc.AdaptersStub(self._channel)
        self._health_check = self._channel.unary_unary(
            _core.HEALTH_CHECK_METHOD,
            request_serializer=_core.HEALTH_REQUEST.SerializeToString,
            response_deserializer=_core.HEALTH_RESPONSE.FromString,
        )
        self._timeout = timeout
        self._metadata = _core.metadata(api_key)

    # -- Inference ---------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[_core.GenerateOptions],
    ) -> GenerateResult:
        """Generate a completion and return it whole."""
        request = _core.build_generate_request(prompt, options)
        return _core.to_generate_result(await self._call(self._stub.Generate, request, timeout))

    async def generate_stream(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[_core.GenerateOptions],
    ) -> AsyncIterator[StreamChunk]:
        """Generate a completion as chunks; closing the iterator early cancels the request."""
        request = _core.build_generate_request(prompt, options)
        call = self._stub.GenerateStream(request, **self._call_kwargs(timeout))
        try:
            async for response in call:
                yield _core.to_stream_chunk(response)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def tokenize(self, text: str, *, timeout: float | None = None) -> TokenizeResult:
        """Token ids of text under the served model's tokenizer."""
        response = await self._call(self._stub.Tokenize, pb.TokenizeRequest(text=text), timeout)
        return _core.to_tokenize_result(response)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The served base model and the server's limits."""
        return _core.to_model_info(await self._call(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status of service ('' is the whole server), e.g. 'SERVING'."""
        request = _core.HEALTH_REQUEST(value=service)
        return _core.serving_status_name(await self._call(self._health_check, request, timeout))

    # -- Adapters (admin scope) ---------------------------------------------------------------

    async def upload_adapter(
        self, directory: str | os.PathLike[str], adapter_id: str, *, timeout: float | None = None
    ) -> AdapterManifest:
        """Upload the top-level files of a PEFT directory as the adapter's next version."""
        requests = _core.upload_requests(adapter_id, _core.adapter_files(directory))
        return _core.to_adapter_manifest(await self._call(self._admin.UploadAdapter, requests, timeout))

    async def load_adapter(
        self, adapter_id: str, pin: bool = False, *, timeout: float | None = None
    ) -> AdapterStatus:
        """Bring the adapter to a device slot now; pinned, it stays there until unloaded."""
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, pin=pin)
        return _core.to_adapter_status(await self._call(self._admin.LoadAdapter, request, timeout))

    async def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> AdapterStatus:
        """Drop the adapter from device and host memory; the server's store keeps it."""
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        return _core.to_adapter_status(await self._call(self._admin.UnloadAdapter, request, timeout))

    async def delete_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        """Remove every version of the adapter."""
        await self._call(self._admin.DeleteAdapter, pb.DeleteAdapterRequest(adapter_id=adapter_id), timeout)

    async def get_adapter(self, adapter_id: str, *, timeout: float | None = None) -> AdapterStatus:
        """The adapter's current manifest and where it is."""
        request = pb.GetAdapterRequest(adapter_id=adapter_id)
        return _core.to_adapter_status(await self._call(self._admin.GetAdapter, request, timeout))

    async def list_adapters(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> AdapterPage:
        """One page of the caller's adapters, sorted by id (page_size 0: the server's default)."""
        request = pb.ListAdaptersRequest(page_size=page_size, page_token=page_token)
        return _core.to_adapter_page(await self._call(self._admin.ListAdapters, request, timeout))

    async def iter_adapters(
        self, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[AdapterStatus]:
        """Every adapter of the caller, fetching page after page."""
        token = ""
        while True:
            page = await self.list_adapters(page_size=page_size, page_token=token, timeout=timeout)
            for status in page.adapters:
                yield status
            token = page.next_page_token
            if not token:
                return

    # -- plumbing -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(
        self, rpc: Callable[..., Awaitable[Response]], request: Any, timeout: float | None
    ) -> Response:
        """One unary-response call, its failure raised from the client's exception tree."""
        try:
            return await rpc(request, **self._call_kwargs(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def _call_kwargs(self, timeout: float | None) -> dict:
        return {"timeout": _core.deadline(timeout, self._timeout), "metadata": self._metadata}
