"""``helios-gateway``: serve the page, the video jobs and the realtime socket with uvicorn.

    helios-gateway --triton localhost:8001 --port 8080
    HELIOS_GATEWAY_TOKEN=secret helios-gateway ...     every /v1 call then needs the token
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .app import GatewaySettings, create_app


def bad_option(args) -> str | None:
    """The first option out of its range, as one line naming it; None when all are in."""
    for name, value, low in (("--max-sessions", args.max_sessions, 1),
                             ("--max-seconds", args.max_seconds, 0.1),
                             ("--max-store-mb", args.max_store_mb, 1),
                             ("--max-age-s", args.max_age_s, 1)):
        if not value >= low:  # NaN too
            return f"{name} must be at least {low:g}, got {value:g}"
    if not 0 <= args.lead_s <= 60:
        return f"--lead-s must be in [0, 60], got {args.lead_s:g}"
    if not 1 <= args.port <= 65535:
        return f"--port must be in [1, 65535], got {args.port}"
    host, _, port = args.triton.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"--triton must be HOST:PORT with PORT in [1, 65535], got {args.triton!r}"
    return None


def main(argv=None) -> int:
    d = GatewaySettings()
    ap = argparse.ArgumentParser(prog="helios-gateway", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--triton", default=d.triton_url, help="Triton's gRPC address")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--max-sessions", type=int, default=d.max_sessions,
                    help="videos generating at once, jobs and live sessions together")
    ap.add_argument("--store", type=Path, default=d.store_dir, help="folder of finished videos")
    ap.add_argument("--max-store-mb", type=float, default=d.max_store_bytes / 2**20)
    ap.add_argument("--max-age-s", type=float, default=d.max_age_s)
    ap.add_argument("--max-seconds", type=float, default=d.max_seconds,
                    help="the longest video a request may ask for")
    ap.add_argument("--lead-s", type=float, default=d.lead_s,
                    help="how far a live session's stream may run ahead of its player")
    ap.add_argument("--cors-origin", action="append", default=[],
                    help="an origin whose pages may call the API (repeatable; default none)")
    args = ap.parse_args(argv)
    problem = bad_option(args)
    if problem:
        print(f"helios-gateway: error: {problem}", file=sys.stderr)
        return 2
    settings = GatewaySettings(
        triton_url=args.triton, max_sessions=args.max_sessions, store_dir=args.store,
        max_store_bytes=int(args.max_store_mb * 2**20), max_age_s=args.max_age_s,
        max_seconds=args.max_seconds, lead_s=args.lead_s,
        token=os.environ.get("HELIOS_GATEWAY_TOKEN") or None, cors_origins=args.cors_origin)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import uvicorn  # noqa: PLC0415

    shown = "localhost" if args.host in ("0.0.0.0", "127.0.0.1") else args.host
    print(f"helios-gateway: open http://{shown}:{args.port}/ (Triton at {args.triton})",
          flush=True)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info",
                ws_max_size=64 * 1024, timeout_graceful_shutdown=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
