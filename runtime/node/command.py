"""``xray-edge serve``: run the DICOM node (extra ``[node]``). Everything heavy is imported when
the command runs, so that ``xray-edge classify`` and ``--help`` start as fast without it."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from ..inputs import DEFAULT_MAX_PIXELS


def serve(
    spool: Annotated[Path, typer.Option(
        "--spool", metavar="DIR", show_default=False,
        help="Folder for received instances, results and the ledger (created 0700; it holds patient data).")],
    allow: Annotated[list[str], typer.Option(
        "--allow", metavar="AET[@HOST,...]", show_default=False,
        help="A calling AE title allowed to send, from any host or only from the given IP addresses or networks "
             "(e.g. CR_ROOM1@10.0.0.21); repeat for each.")],
    send_to: Annotated[Optional[list[str]], typer.Option(
        "--send-to", metavar="AET@HOST:PORT",
        help="Store the results (report and heatmap image) there by C-STORE; repeat for each (default: none, "
             "results stay on the worklist).")] = None,
    ae_title: Annotated[str, typer.Option(
        "--ae-title", metavar="AET", show_default=True, help="The node's AE title (peers must call it).")] = "XRAY_EDGE",
    port: Annotated[int, typer.Option(
        min=1, max=65535, metavar="N", show_default=True, help="DICOM port.")] = 11112,
    bind: Annotated[str, typer.Option(
        metavar="ADDRESS", show_default=True, help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    model: Annotated[Optional[Path], typer.Option(
        "--model", "-m", metavar="FILE", help="ONNX model exported by xray-edge (default: the shipped model).")] = None,
    site: Annotated[Optional[Path], typer.Option(
        "--site", metavar="FILE", envvar="XRAY_EDGE_SITE", show_envvar=True,
        help="Apply this site profile (from `xray-edge calibrate`, fitted for this model) (default: none).")] = None,
    threads: Annotated[int, typer.Option(
        min=0, metavar="N", show_default=True, help="onnxruntime threads; 0: one per core.")] = 0,
    batch_size: Annotated[int, typer.Option(
        min=1, max=64, metavar="N", show_default=True, help="Instances classified together at most.")] = 4,
    max_instance_mb: Annotated[int, typer.Option(
        min=1, metavar="MiB", show_default=True,
        help="Largest instance accepted; a peer sending more in one message is cut off.")] = 128,
    max_pixels: Annotated[int, typer.Option(
        min=1, metavar="N", show_default=True,
        help="Refuse images with more pixels (decompression bombs).")] = DEFAULT_MAX_PIXELS,
    min_free_mb: Annotated[int, typer.Option(
        min=0, metavar="MiB", show_default=True,
        help="Refuse instances (status 0xA700) rather than leave less free on the spool's disk.")] = 1024,
    max_spool_mb: Annotated[int, typer.Option(
        min=0, metavar="MiB", show_default=True,
        help="Refuse instances (0xA700) once the spool holds this much; 0: no cap but the disk's.")] = 0,
    max_associations: Annotated[int, typer.Option(
        min=1, max=64, metavar="N", show_default=True,
        help="Associations at once (each may hold one instance of up to --max-instance-mb in memory).")] = 4,
    timeout: Annotated[float, typer.Option(
        min=1, metavar="S", show_default=True,
        help="Seconds a peer has to negotiate, answer or go on sending before the node hangs up.")] = 30,
    retry_delay: Annotated[float, typer.Option(
        min=0.1, metavar="S", show_default=True,
        help="First retry of a result a destination did not take, after S seconds, doubling up to --retry-max.")] = 10,
    retry_max: Annotated[float, typer.Option(
        min=0.1, metavar="S", show_default=True, help="Longest wait between retries of a result.")] = 600,
    keep_days: Annotated[float, typer.Option(
        min=0, metavar="DAYS", show_default=True,
        help="Remove the spooled files of finished instances after DAYS (the ledger keeps their rows); 0: keep.")] = 30,
    tls_cert: Annotated[Optional[Path], typer.Option(
        metavar="FILE", help="Receive over TLS with this certificate (PEM; needs --tls-key).")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(metavar="FILE", help="The certificate's private key (PEM).")] = None,
    tls_client_ca: Annotated[Optional[Path], typer.Option(
        metavar="FILE", help="With TLS, peers must present a certificate signed by this CA (PEM).")] = None,
    send_tls_ca: Annotated[Optional[Path], typer.Option(
        metavar="FILE", help="Send over TLS; destinations' certificates must be signed by this CA (PEM).")] = None,
    send_tls_cert: Annotated[Optional[Path], typer.Option(
        metavar="FILE", help="The node's certificate for destinations that ask for one (PEM; needs --send-tls-key).")] = None,
    send_tls_key: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Its private key (PEM).")] = None,
    http_port: Annotated[int, typer.Option(
        min=0, max=65535, metavar="N", show_default=True, help="Worklist page and /healthz; 0: none.")] = 8104,
    http_bind: Annotated[str, typer.Option(
        metavar="ADDRESS", show_default=True,
        help="Address of the worklist page; any but loopback needs --http-token-file.")] = "127.0.0.1",
    http_token_file: Annotated[Optional[Path], typer.Option(
        metavar="FILE", help="A file holding the token the worklist asks for (?token=...).")] = None,
) -> None:
    """Run a DICOM node: receive chest radiographs by C-STORE, classify them, send the results back."""
    from ..extras import require

    require("node", "pynetdicom", "highdicom")
    from .config import (ConfigError, NodeConfig, ae_title as checked_title, client_tls, destination, is_loopback,
                         peer, server_tls)
    from .service import run

    try:
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if tls_client_ca is not None and tls_cert is None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        if (send_tls_cert is None) != (send_tls_key is None) or (send_tls_cert is not None and send_tls_ca is None):
            raise ConfigError("--send-tls-cert and --send-tls-key go together, with --send-tls-ca")
        token = _token(http_token_file)
        if http_port and not is_loopback(http_bind) and not token:
            raise ConfigError(f"--http-bind {http_bind} is not a loopback address: give --http-token-file")
        config = NodeConfig(
            ae_title=checked_title(ae_title, "--ae-title"), bind=bind, port=port, allowed=tuple(map(peer, allow)),
            destinations=tuple(map(destination, send_to or [])), spool=spool,
            max_instance_bytes=max_instance_mb << 20, max_pixels=max_pixels, min_free_bytes=min_free_mb << 20,
            max_spool_bytes=max_spool_mb << 20, max_associations=max_associations, timeout=timeout,
            retry_delay=retry_delay, retry_max=max(retry_max, retry_delay), batch_size=batch_size, keep_days=keep_days,
            tls=server_tls(tls_cert, tls_key, tls_client_ca) if tls_cert and tls_key else None,
            send_tls=client_tls(send_tls_ca, send_tls_cert, send_tls_key) if send_tls_ca else None,
            http_bind=http_bind, http_port=http_port, http_token=token)
    except ConfigError as e:
        _usage(str(e))
    raise typer.Exit(run(config, model, threads, site or None))


def _token(path: Path | None) -> str:
    from .config import ConfigError

    if path is None:
        return ""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read --http-token-file {path} ({getattr(e, 'strerror', None) or e})") from None
    if len(token) < 16 or not token.isprintable() or " " in token:
        raise ConfigError(f"--http-token-file {path}: the token must be at least 16 printable characters, no spaces")
    return token


def _usage(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)
