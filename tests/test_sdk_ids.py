"""Protocol v2 request ids (``Device._new_id``): short, and never the same twice for one device,
across restarts and crashes, since ``send`` is idempotent by (device, id) for good."""

from __future__ import annotations

import json
import time
from pathlib import Path

from clients.sdk import ID_BLOCK, Device, Profile


def profile(path: Path | None = None, ids_from: int = 1) -> Profile:
    p = Profile(http_url="http://127.0.0.1:1", user_id="u1", device_id="d1", token="t", expires_at=0,
                mqtt_host="127.0.0.1", mqtt_port=1, ws_url="ws://127.0.0.1:1/mqtt", ids_from=ids_from)
    if path is not None:
        p.save(path)
    return p


def test_a_device_fresh_from_login_counts_from_1_in_base_36() -> None:
    dev = Device(profile())
    ids = [dev._new_id() for _ in range(40)]
    assert ids[:3] == ["1", "2", "3"] and ids[9] == "a" and ids[35] == "10"
    assert max(len(i) for i in ids) == 2


def test_a_block_is_recorded_before_its_first_id_so_a_crash_never_repeats_one(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    dev = Device(profile(path))
    first = [dev._new_id() for _ in range(ID_BLOCK + 5)]  # into the second block
    assert json.loads(path.read_text())["ids_from"] == 1 + 2 * ID_BLOCK
    # the process dies here: nothing else is saved; the next run loads what is on disk
    again = Device(Profile.load(path))
    later = [again._new_id() for _ in range(10)]
    assert not set(first) & set(later)
    assert int(later[0], 36) == 1 + 2 * ID_BLOCK


def test_the_cursor_save_keeps_the_counter(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    dev = Device(profile(path))
    used = {dev._new_id() for _ in range(3)}
    dev._save_cursor()  # what an ack does
    assert json.loads(path.read_text())["ids_from"] == 1 + ID_BLOCK
    assert not used & {Device(Profile.load(path))._new_id() for _ in range(3)}


def test_no_known_counter_starts_above_every_earlier_id() -> None:
    """A profile from an older SDK (ids: microseconds since the epoch in base 36) or put together
    by hand after the saved one was lost starts at the clock's microseconds."""
    older = int(time.time() * 1_000_000)
    dev = Device(profile(ids_from=0))
    first = int(dev._new_id(), 36)
    assert first >= older
    assert int(dev._new_id(), 36) == first + 1


def test_v1_ids_stay_random_hex() -> None:
    dev = Device(profile(), proto=1)
    a, b = dev._new_id(), dev._new_id()
    assert a != b and len(a) == 32 and int(a, 16) >= 0
