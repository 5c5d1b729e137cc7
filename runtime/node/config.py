"""What the node is told on the command line, checked before anything starts: its AE title and
addresses, the peers allowed to send (``AET`` or ``AET@HOST``, HOST an address or network), the
destinations results go to (``AET@HOST:PORT``), the spool and its limits, TLS."""
from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A setting that cannot be used; the message is one line naming it."""


@dataclass(frozen=True)
class Peer:
    """A calling AE title allowed to send, from any host or only from ``networks``."""

    ae_title: str
    networks: tuple[IpNetwork, ...] = ()

    def admits(self, ae_title: str, host: str) -> bool:
        return ae_title == self.ae_title and (not self.networks or in_networks(host, self.networks))


@dataclass(frozen=True)
class Destination:
    """A DICOM peer the results are stored to."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


@dataclass(frozen=True)
class NodeConfig:
    """Everything the node runs with (see ``xray-edge serve --help`` for each)."""

    ae_title: str
    bind: str
    port: int
    allowed: tuple[Peer, ...]
    destinations: tuple[Destination, ...]
    spool: Path
    max_instance_bytes: int
    max_pixels: int
    min_free_bytes: int
    max_spool_bytes: int  # 0: no cap but the disk's
    max_associations: int
    timeout: float  # seconds: association negotiation, DIMSE replies, silence on a connection
    retry_delay: float  # first retry of a delivery after this many seconds, doubling up to retry_max
    retry_max: float
    batch_size: int
    keep_days: float  # spooled files of finished instances are removed after this many days (0: kept)
    tls: ssl.SSLContext | None = field(default=None, compare=False)  # receiving
    send_tls: ssl.SSLContext | None = field(default=None, compare=False)  # sending
    http_bind: str = "127.0.0.1"
    http_port: int = 0  # 0: no worklist page
    http_token: str = ""


def in_networks(host: str, networks: tuple[IpNetwork, ...]) -> bool:
    """True if the address ``host`` lies in one of ``networks``."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def allowed_networks(peers: tuple[Peer, ...]) -> tuple[IpNetwork, ...] | None:
    """The networks a connection may come from at all (None: any, when a peer is allowed from
    any host)."""
    if any(not p.networks for p in peers):
        return None
    return tuple(n for p in peers for n in p.networks)


def ae_title(value: str, what: str = "AE title") -> str:
    """``value`` if it is a usable AE title: 1-16 printable ASCII characters, no backslash, not
    only spaces (leading and trailing spaces are not significant and are dropped)."""
    title = value.strip()
    if not title or len(value.rstrip()) > 16 or any(not " " <= c <= "~" or c == "\\" for c in value):
        raise ConfigError(f"{what} {value!r} is not an AE title (1-16 printable ASCII characters, no backslash)")
    return title


def peer(value: str) -> Peer:
    """``AET`` (from any host) or ``AET@HOST[,HOST...]`` with each HOST an IP address or network
    (10.0.0.5, 10.0.0.0/24, ::1)."""
    title, _, hosts = value.partition("@")
    networks = []
    for host in filter(None, (h.strip() for h in hosts.split(","))):
        try:
            networks.append(ipaddress.ip_network(host, strict=False))
        except ValueError:
            raise ConfigError(f"--allow {value!r}: {host!r} is not an IP address or network (host names are "
                              "not looked up)") from None
    if hosts and not networks:
        raise ConfigError(f"--allow {value!r}: no host after '@'")
    return Peer(ae_title(title, f"--allow {value!r}: AE title"), tuple(networks))


def destination(value: str) -> Destination:
    """``AET@HOST:PORT`` (an IPv6 address in brackets: ``AET@[::1]:104``)."""
    title, at, address = value.partition("@")
    host, colon, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not at or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--send-to {value!r} is not AET@HOST:PORT")
    return Destination(ae_title(title, f"--send-to {value!r}: AE title"), host, int(port))


def is_loopback(host: str) -> bool:
    """True for a loopback address or 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_tls(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """TLS for receiving (1.2 or later) with the node's certificate; with ``client_ca``, a peer
    must present a certificate signed by it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot use the TLS certificate {cert}, key {key}"
                          f"{f' or client CA {client_ca}' if client_ca else ''} ({e})") from None
    return context


def client_tls(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """TLS for sending: the destination's certificate must be signed by ``ca`` and name its host;
    ``cert``/``key``: the node's own certificate, for destinations that ask for one."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot use the TLS CA {ca}{f', certificate {cert} or key {key}' if cert else ''} "
                          f"({e})") from None
    return context
