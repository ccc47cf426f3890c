"""optuna-dashboard on a study store, with the trial images (:mod:`tuner.store.artifacts`) beside each trial.

The dashboard has no login and lets anyone who reaches it rename, delete and tell trials, so it
binds 127.0.0.1 unless told otherwise; bound to any other address it says so on stderr. To look at
a remote store from a laptop, keep the default and tunnel: ``ssh -L 8080:127.0.0.1:8080 host``.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from pathlib import Path

import optuna_dashboard

from tuner.errors import TunerError
from tuner.store.artifacts import artifact_store, artifacts_root
from tuner.store.urls import check_storage, mask_url, open_storage, store_exists

__all__ = ["is_loopback", "serve"]


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback one (127.0.0.0/8, ::1); unknown names are not."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def serve(storage_url: str, host: str = "127.0.0.1", port: int = 8080, artifacts: str | Path | None = None) -> None:
    """Serve the dashboard for every study in `storage_url` until Ctrl-C (blocks).

    artifacts: the artifact root the workers used (--artifacts / $TUNER_ARTIFACTS; default beside
    the store), so the images uploaded by trials show on their pages.
    """
    check_storage(storage_url)
    if not store_exists(storage_url):
        raise TunerError(
            f"storage '{mask_url(storage_url)}': no such file; run a study first (tuner run) or fix --storage"
        )
    _check_port_free(host, port)
    # Optuna's own RDBStorage, not the workers' cache: the dashboard's RDB features need its class
    storage = open_storage(storage_url, heartbeat_interval=None, grace_period=None).backend
    store = artifact_store(storage_url, artifacts)
    if not is_loopback(host):
        print(
            f"warning: the dashboard has no login and binds {host}:{port}: anyone who reaches this host can "
            "see, change and delete studies; bind 127.0.0.1 and use an SSH tunnel instead",
            file=sys.stderr, flush=True,
        )
    print(f"dashboard: http://{_url_host(host)}:{port}/dashboard  (studies in {mask_url(storage_url)}, "
          f"images in {artifacts_root(storage_url, artifacts) / 'optuna'})", flush=True)
    optuna_dashboard.run_server(storage, host=host, port=port, artifact_store=store)


def _check_port_free(host: str, port: int) -> None:
    """TunerError unless (host, port) can be bound the way the server binds it (SO_REUSEADDR)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise TunerError(f"--host '{host}' is not an address of this machine ({err.strerror}); "
                         "use 127.0.0.1 or an address of a local interface") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise TunerError(f"--port {port} is in use on {host}; stop what listens there or choose "
                                 "another --port") from None
            raise TunerError(f"--host '{host}' --port {port}: cannot listen there ({err.strerror}); use "
                             "127.0.0.1 or a local interface's address, and a port above 1023") from None


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):  # every interface: this host's own loopback reaches it too
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
