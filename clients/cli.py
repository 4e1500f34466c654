"""The ``pigeon`` command: run the server, and chat from a terminal."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from bridge.config import secret_from_env, settings
from bridge.errors import PigeonError

app = typer.Typer(help="Pigeon: messaging over MQTT for phones and IoT devices.", no_args_is_help=True)
group_app = typer.Typer(help="Create and manage groups.", no_args_is_help=True)
app.add_typer(group_app, name="group")
console = Console()
err = Console(stderr=True)

ProfileOpt = Annotated[
    Path, typer.Option("--profile", envvar="PIGEON_PROFILE", help="Where the login and sync cursor are kept.")
]
DEFAULT_PROFILE = Path.home() / ".config" / "pigeon" / "profile.json"


@app.command()
def serve(
    dev: Annotated[bool, typer.Option("--dev", envvar="PIGEON_DEV", help="Return login codes in the reply.")] = False,
    data_dir: Annotated[Path, typer.Option(envvar="PIGEON_DATA_DIR")] = Path(".pigeon"),
    host: Annotated[str, typer.Option(envvar="PIGEON_HOST")] = "127.0.0.1",
    public_host: Annotated[str | None, typer.Option(envvar="PIGEON_PUBLIC_HOST")] = None,
    mqtt_port: Annotated[int, typer.Option(envvar="PIGEON_MQTT_PORT")] = 1883,
    ws_port: Annotated[int, typer.Option(envvar="PIGEON_WS_PORT")] = 8083,
    http_port: Annotated[int, typer.Option(envvar="PIGEON_HTTP_PORT")] = 8080,
    store: Annotated[str | None, typer.Option(envvar="PIGEON_STORE", help="sqlite:///PATH")] = None,
    media: Annotated[str | None, typer.Option(envvar="PIGEON_MEDIA", help="file:///PATH")] = None,
    sms_webhook: Annotated[str | None, typer.Option(envvar="PIGEON_SMS_WEBHOOK")] = None,
    rate: Annotated[float, typer.Option(envvar="PIGEON_RATE", help="Requests/s per device")] = 50.0,
    burst: Annotated[int, typer.Option(envvar="PIGEON_BURST")] = 200,
    max_group: Annotated[int, typer.Option(envvar="PIGEON_MAX_GROUP")] = 100,
    max_payload: Annotated[int, typer.Option(envvar="PIGEON_MAX_PAYLOAD")] = 64 * 1024,
    media_max_bytes: Annotated[int, typer.Option(envvar="PIGEON_MEDIA_MAX_BYTES")] = 100 * 1024 * 1024,
    media_url_ttl: Annotated[int, typer.Option(envvar="PIGEON_MEDIA_URL_TTL", help="seconds")] = 600,
    log_level: Annotated[str, typer.Option(envvar="PIGEON_LOG_LEVEL")] = "INFO",
) -> None:
    """Run broker, bridge and HTTP API in one process (embedded default: nothing to install)."""
    from bridge.app import PigeonServer

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("amqtt", "transitions", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = settings(
            dev=dev, data_dir=data_dir, host=host, public_host=public_host, mqtt_port=mqtt_port,
            ws_port=ws_port, http_port=http_port, store=store, media=media, sms_webhook=sms_webhook,
            rate_per_s=rate, rate_burst=burst, max_group=max_group, max_payload=max_payload,
            media_max_bytes=media_max_bytes, media_url_ttl_s=media_url_ttl, secret=secret_from_env() or None,
        ).validated()
    except PigeonError as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(2) from exc

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with PigeonServer(cfg) as server:
            ep = server.endpoints
            print(
                f"pigeon ready http=http://{ep.host}:{server.http_port} mqtt={ep.host}:{ep.mqtt_port}"
                f" ws=ws://{ep.host}:{ep.ws_port}/mqtt data={cfg.data_dir}",
                flush=True,
            )
            await stop.wait()

    try:
        asyncio.run(run())
    except PigeonError as exc:
        err.print(f"[red]pigeon could not start:[/] {exc}")
        raise typer.Exit(1) from exc


def main() -> None:
    app()


if __name__ == "__main__":
    main()


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)


__all__ = ["app", "main"]
_ = sys
