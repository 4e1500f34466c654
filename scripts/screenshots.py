"""Take the README's screenshots of the web client: a fresh `pigeon serve --dev` on free loopback
ports, a short conversation between two browsers and a Python device, and Debian's Chromium.

    python scripts/screenshots.py            # writes docs/screenshots/*.png
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients.launch import ServerProc  # noqa: E402
from clients.sdk import Device, login  # noqa: E402
from tests.test_web import logged_in, open_direct, png, send_text  # noqa: E402
from tests.web_browser import chromium  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
SIZE = {"width": 1100, "height": 640}


async def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    srv = ServerProc.start(Path(tempfile.mkdtemp(prefix="pigeon-shots-")))
    try:
        async with chromium() as browser:
            ctx = await browser.new_context(viewport=SIZE)  # type: ignore[attr-defined]
            page = await ctx.new_page()
            await page.goto(srv.http)
            await page.get_by_test_id("phone").fill("+15550001111")
            await page.get_by_test_id("request-code").click()
            await page.get_by_test_id("name").fill("Alice")
            await page.wait_for_timeout(300)
            await page.screenshot(path=OUT / "login.png")
            await ctx.close()

            bob_profile = await login(srv.http, "+15550002222", device_name="python")
            carol_profile = await login(srv.http, "+15550003333", device_name="python")
            async with Device(bob_profile) as bob, Device(carol_profile) as carol:
                await bob.api.rename("Bob")
                await carol.api.rename("Carol")
                _, alice = await logged_in(browser, srv.http, "+15550001111", name="Alice")  # type: ignore[arg-type]
                await alice.set_viewport_size(SIZE)
                await open_direct(alice, "+15550002222")
                await send_text(alice, "Hi Bob! Are we still on for Saturday?")
                ev = await _next_msg(bob)
                await bob.read(ev["chat"], ev["seq"])
                await bob.send("Yes! 10 am at the park. Bring the map.", chat=ev["chat"])
                await alice.get_by_test_id("attach").set_input_files(
                    files=[{"name": "map.png", "mimeType": "image/png", "buffer": png(160, 100)}])
                await alice.wait_for_timeout(800)
                await bob.typing(ev["chat"])
                await alice.wait_for_timeout(300)
                await alice.screenshot(path=OUT / "conversation.png")

                await alice.locator("summary").click()
                await alice.get_by_test_id("group-title").fill("Book club")
                await alice.get_by_test_id("group-members").fill("+15550002222, +15550003333")
                await alice.get_by_test_id("create-group").click()
                await alice.wait_for_timeout(500)
                await send_text(alice, "First chapter by Friday?")
                g = await _next_msg(carol)
                await carol.read(g["chat"], g["seq"])
                await carol.send("Deal.", chat=g["chat"])
                await bob.send("I'm in", to=carol_profile.user_id)
                await alice.wait_for_timeout(5500)  # the group's per-member receipts refresh
                await alice.screenshot(path=OUT / "group.png")
    finally:
        srv.stop()
    print(f"screenshots in {OUT}")


async def _next_msg(dev: Device) -> dict[str, object]:
    while True:
        ev = await dev.next_event(timeout=15)
        if ev.get("type") == "msg" and ev.get("kind") == "text" and ev.get("from") != dev.profile.user_id:
            return ev


if __name__ == "__main__":
    asyncio.run(main())
