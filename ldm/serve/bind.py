"""Who may connect: the bind rule of `sd serve`, checked before anything heavy is imported or loaded."""
from __future__ import annotations

import ipaddress
from typing import Optional

from ldm.errors import SDError


def check_bind(host: str, auth: Optional[tuple[str, str]], insecure: bool) -> str:
    """The line to print at start; SDError for a non-loopback host with neither credentials nor --insecure."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return "only this machine can connect" + (" (HTTP Basic auth on)" if auth else "")
    if auth:
        return f"listening on {host}: every route needs HTTP Basic auth"
    if insecure:
        return f"listening on {host} WITHOUT authentication (--insecure): anyone who can reach it can use it"
    raise SDError(f"--host {host} lets other machines connect: pass --api-auth USER:PASSWORD, or --insecure to "
                  "serve without authentication")
