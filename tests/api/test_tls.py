"""serve() over TLS in its own process (FakeEngine): gRPC and HTTP, mutual TLS, and SIGHUP reloads.

The CA and certificates are made here with the README's openssl commands.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest

from peftserve.bench.server import ServerProcess, source_env
from peftserve.cli import main as cli_main
from peftserve_client import AsyncClient, Client, PeftServeError
from tests.helpers.certs import Issued, issue, make_ca

SERVE_TLS = """
import asyncio, sys
from fake_engine import FakeEngine
from peftserve.api.server import serve
from peftserve.cli import configure_logging
from peftserve.config import ServerConfig, TlsConfig

configure_logging("INFO")
cert, key, client_ca = sys.argv[1], sys.argv[2], sys.argv[3] or None
config = ServerConfig(port=0, http_port=0, metrics_port=0, grace_s=1, tls=TlsConfig(cert, key, client_ca))
asyncio.run(serve(config, lambda _: FakeEngine()))
"""


class Pki:
    """Two CAs, a server certificate from each, and a client certificate from each."""

    def __init__(self, directory: Path) -> None:
        self.ca, self.other_ca = make_ca(directory, "ca"), make_ca(directory, "other-ca")
        self.server = issue(self.ca, directory, "server", server=True)
        self.other_server = issue(self.other_ca, directory, "other-server", server=True)
        self.client = issue(self.ca, directory, "client")
        self.other_client = issue(self.other_ca, directory, "other-client")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


class TlsServer:
    """A serve() process over TLS: its gRPC address and its https:// root."""

    def __init__(self, cert: Issued, client_ca: Path | None) -> None:
        argv = [sys.executable, "-c", SERVE_TLS, str(cert.cert), str(cert.key), str(client_ca or "")]
        self.process = ServerProcess(argv, env=source_env(Path(__file__).parent))
        self.address = self.process.wait_ready(timeout_s=30)
        assert self.process.http_url is not None and self.process.http_url.startswith("https://")
        assert self.process.metrics_url is not None and self.process.metrics_url.startswith("https://")
        self.url = self.process.http_url
        self.metrics_url = self.process.metrics_url


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[TlsServer]:
    server = TlsServer(pki.server, None)
    yield server
    server.process.stop()


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[TlsServer]:
    server = TlsServer(pki.server, pki.ca.cert)
    yield server
    server.process.stop()


def https(ca: Path, client: Issued | None = None) -> httpx2.Client:
    context = ssl.create_default_context(cafile=ca)
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    return httpx2.Client(verify=context, timeout=10)


def test_the_sdk_connects_with_the_ca(tls_server: TlsServer, pki: Pki) -> None:
    with Client(tls_server.address, timeout=10, ca_file=pki.ca.cert) as client:
        assert client.health() == "SERVING"
        assert client.generate("tls", max_new_tokens=3).text == "tls"

    async def run() -> str:
        async with AsyncClient(tls_server.address, timeout=10, ca_file=pki.ca.cert) as client:
            return (await client.generate("async", max_new_tokens=5)).text

    assert asyncio.run(run()) == "async"


def test_cli_commands_take_the_ca_as_a_flag_or_from_the_environment(
    tls_server: TlsServer, pki: Pki, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["health", "--address", tls_server.address, "--tls-ca", str(pki.ca.cert)]) == 0
    monkeypatch.setenv("PEFTSERVE_TLS_CA", str(pki.ca.cert))
    assert (
        cli_main(["generate", "--address", tls_server.address, "--prompt", "env", "--max-new-tokens", "3"])
        == 0
    )
    assert capsys.readouterr().out.splitlines()[-1] == "env"


def test_openai_health_and_metrics_over_https(tls_server: TlsServer, pki: Pki) -> None:
    with https(pki.ca.cert) as http:
        assert http.get(f"{tls_server.url}/health").json() == {"status": "SERVING"}
        assert "peftserve_requests_total" in http.get(tls_server.metrics_url).text
        c = openai.OpenAI(base_url=f"{tls_server.url}/v1", api_key="k", http_client=http, max_retries=0)
        assert c.completions.create(model="fake", prompt="https", max_tokens=5).choices[0].text == "https"


def test_plaintext_and_untrusting_clients_fail(tls_server: TlsServer, pki: Pki) -> None:
    with Client(tls_server.address, timeout=5) as plain, pytest.raises(PeftServeError):
        plain.health()
    with (
        Client(tls_server.address, timeout=5, ca_file=pki.other_ca.cert) as wrong,
        pytest.raises(PeftServeError),
    ):
        wrong.health()
    plain_url = tls_server.url.replace("https://", "http://")
    for url in (f"{plain_url}/health", tls_server.metrics_url.replace("https://", "http://")):
        with pytest.raises(httpx2.HTTPError):
            httpx2.get(url, timeout=5)
    with https(pki.other_ca.cert) as wrong, pytest.raises(httpx2.ConnectError):
        wrong.get(f"{tls_server.url}/health")


def test_mutual_tls_refuses_clients_without_a_certificate_of_the_ca(mtls_server: TlsServer, pki: Pki) -> None:
    with Client(
        mtls_server.address,
        timeout=10,
        ca_file=pki.ca.cert,
        cert_file=pki.client.cert,
        key_file=pki.client.key,
    ) as client:
        assert client.health() == "SERVING"
    with https(pki.ca.cert, pki.client) as http:
        assert http.get(f"{mtls_server.url}/health").status_code == 200
        assert http.get(mtls_server.metrics_url).status_code == 200

    for cert in (None, pki.other_client):
        files = {"cert_file": cert.cert, "key_file": cert.key} if cert else {}
        with Client(mtls_server.address, timeout=5, ca_file=pki.ca.cert, **files) as refused:
            with pytest.raises(PeftServeError):
                refused.health()
        for url in (f"{mtls_server.url}/health", mtls_server.metrics_url):
            with https(pki.ca.cert, cert) as refused, pytest.raises(httpx2.HTTPError):
                refused.get(url)


def _wait_for_log(server: ServerProcess, text: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(text in line for line in server.log):
        assert time.monotonic() < deadline, f"no log line with {text!r}:\n{server.tail()}"
        time.sleep(0.05)


def test_sighup_rereads_certificate_key_and_client_ca(pki: Pki, tmp_path: Path) -> None:
    live = Issued(tmp_path / "server.pem", tmp_path / "server.key")
    client_ca = tmp_path / "client-ca.pem"
    for source, target in (
        (pki.server.cert, live.cert),
        (pki.server.key, live.key),
        (pki.ca.cert, client_ca),
    ):
        shutil.copy(source, target)
    server = TlsServer(live, client_ca)
    try:
        old = {"ca_file": pki.ca.cert, "cert_file": pki.client.cert, "key_file": pki.client.key}
        new = {
            "ca_file": pki.other_ca.cert,
            "cert_file": pki.other_client.cert,
            "key_file": pki.other_client.key,
        }
        with Client(server.address, timeout=5, **old) as client:
            assert client.health() == "SERVING"

        client_ca.write_text("not a certificate")  # a broken set is refused; what is in use stays
        server.process.proc.send_signal(signal.SIGHUP)
        _wait_for_log(server.process, "TLS files not reloaded")
        with Client(server.address, timeout=5, **old) as client:
            assert client.health() == "SERVING"

        shutil.copy(pki.other_server.cert, live.cert)
        shutil.copy(pki.other_server.key, live.key)
        shutil.copy(pki.other_ca.cert, client_ca)
        server.process.proc.send_signal(signal.SIGHUP)
        _wait_for_log(server.process, "TLS files reloaded")
        with Client(server.address, timeout=5, **new) as client:
            assert client.health() == "SERVING"
        with Client(server.address, timeout=5, **old) as client, pytest.raises(PeftServeError):
            client.health()
        for url in (f"{server.url}/health", server.metrics_url):
            with https(pki.other_ca.cert, pki.other_client) as http:
                assert http.get(url).status_code == 200
            with https(pki.ca.cert, pki.client) as http, pytest.raises(httpx2.HTTPError):
                http.get(url)
    finally:
        server.process.stop()
