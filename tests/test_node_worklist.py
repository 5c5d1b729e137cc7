"""The node's worklist page and health endpoint over real HTTP (in the test process, on a ledger
the node's own classifier filled), and the ``serve`` command line's refusals."""
from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from node_peers import classify_in_process, ledger_rows, radiograph  # noqa: E402
from tiny_model import make_tiny_onnx  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from xray_edge.cli import app  # noqa: E402
from xray_edge.node import worklist  # noqa: E402

TOKEN = "a-token-of-32-characters-or-so-x"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_onnx(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="module")
def spool(tmp_path_factory, model):
    """Three classified arrivals, the last with hostile text in its patient ID."""
    folder = tmp_path_factory.mktemp("worklist") / "spool"
    hostile = radiograph("DX", 3)
    hostile.PatientID = '<script>alert("x")</script>'
    classify_in_process(folder, model, [radiograph("CR", 1), radiograph("CR", 2), hostile])
    return folder


@pytest.fixture
def serve(spool):
    """start(token, health) -> base URL of a worklist on a free port; stopped afterwards."""
    servers = []

    def start(token: str = "", health: dict | None = None) -> str:
        report = health or {"status": "ok", "problems": [], "ae_title": "XRAY_EDGE"}
        server = worklist.start("127.0.0.1", 0, spool / "ledger.sqlite3", ["COVID", "NORMAL", "VIRAL_PNEUMONIA"],
                                "tiny-test-model 0.0.1 fp32", token, lambda: report)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def get(url: str, headers: dict | None = None) -> tuple[int, str, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as rsp:
            return rsp.status, rsp.headers.get_content_type(), rsp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get_content_type(), e.read()


def test_the_page_lists_arrivals_newest_first_with_their_cards(serve, spool):
    base = serve()
    status, kind, body = get(base + "/")
    page = body.decode()
    assert (status, kind) == (200, "text/html")
    assert '<meta http-equiv="refresh"' in page and "not for diagnostic use" in page
    rows = sorted(ledger_rows(spool), key=lambda r: r["received_at"], reverse=True)
    positions = [page.index(f"/pictures/{r['sop_instance_uid']}.thumb.png") for r in rows]
    assert positions == sorted(positions)  # newest first
    decision = json.loads(rows[0]["row"])["decision"]
    assert f'<span class="badge {decision}">' in page and "classified (no destination)" in page
    assert "<script>" not in page and "&lt;script&gt;" in page  # peer data is escaped
    for r in rows:
        for kind in ("thumb", "heat"):
            status, content, png = get(f"{base}/pictures/{r['sop_instance_uid']}.{kind}.png")
            assert (status, content, png[:4]) == (200, "image/png", b"\x89PNG")
    assert get(base + "/pictures/1.2.3.thumb.png")[0] == 404
    assert get(base + "/pictures/../ledger.sqlite3")[0] == 404
    assert get(base + "/anything")[0] == 404


def test_a_token_is_asked_for_everything_but_the_health_check(serve, spool):
    base = serve(token=TOKEN)
    assert get(base + "/")[0] == 401
    assert get(base + "/?token=wrong")[0] == 401
    status, _, body = get(f"{base}/?token={TOKEN}")
    assert status == 200 and f".thumb.png?token={TOKEN}" in body.decode()
    assert get(base + "/", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    uid = ledger_rows(spool)[0]["sop_instance_uid"]
    assert get(f"{base}/pictures/{uid}.heat.png")[0] == 401
    assert get(f"{base}/pictures/{uid}.heat.png?token={TOKEN}")[0] == 200
    assert get(base + "/healthz")[0] == 200


def test_the_health_check_says_503_with_the_problems(serve):
    base = serve(health={"status": "degraded", "problems": ["the classification worker has stopped"]})
    status, kind, body = get(base + "/healthz")
    assert (status, kind, json.loads(body)["problems"]) == (503, "application/json",
                                                            ["the classification worker has stopped"])


@pytest.mark.parametrize("args, message", [
    (["--send-to", "PACS@host"], "is not AET@HOST:PORT"),
    (["--ae-title", "A" * 17], "is not an AE title"),
    (["--allow", "PACS@somehost"], "is not an IP address or network"),
    (["--http-bind", "0.0.0.0"], "give --http-token-file"),
    (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "missing.pem", "--tls-key", "missing.key"], "cannot use the TLS certificate missing.pem"),
    (["--send-tls-ca", "missing-ca.pem"], "cannot use the TLS CA missing-ca.pem"),
])
def test_serve_refuses_unusable_settings_in_one_line(tmp_path, args, message):
    result = CliRunner().invoke(app, ["serve", "--spool", str(tmp_path / "spool"), "--allow", "MODALITY", *args])
    assert result.exit_code == 2 and message in result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert not (tmp_path / "spool").exists()


def test_serve_needs_an_allowed_peer_and_a_usable_model(tmp_path, caplog):
    result = CliRunner().invoke(app, ["serve", "--spool", str(tmp_path / "spool")])
    assert result.exit_code == 2 and "--allow" in result.output
    with caplog.at_level(logging.INFO, logger="xray_edge.node"):
        result = CliRunner().invoke(app, ["serve", "--spool", str(tmp_path / "spool"), "--allow", "MODALITY",
                                          "--model", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"cannot start: {tmp_path / 'missing.onnx'}: model file not found"]
