"""The same end-to-end flows with the bridge consuming ``up/+/+`` as an MQTT client.

The tests are the ones of the in-process mode, imported here so they run again against a
server started with ``--ingest mqtt`` (this module's ``server`` fixture wins over the shared one).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import ServerProc
from tests.test_e2e_errors_permissions import (  # noqa: F401 - collected again here
    test_every_malformed_payload_gets_an_error_and_changes_nothing,
    test_publishing_outside_own_up_topic_changes_nothing,
    test_subscriptions_outside_own_topics_are_refused,
)
from tests.test_e2e_media import test_upload_send_and_download_by_members_only  # noqa: F401
from tests.test_e2e_messaging import (  # noqa: F401
    test_ack_gives_sender_a_delivered_receipt_and_read_a_read_receipt,
    test_direct_message_reaches_peer_and_senders_other_devices,
    test_group_system_messages_fan_out_and_aggregate_receipts,
    test_offline_device_catches_up_with_sync_in_batches,
    test_presence_watch_will_and_last_seen,
    test_publish_and_disconnect_device_is_stored,
    test_seq_is_gap_free_and_keeps_one_devices_order,
    test_typing_goes_only_to_online_members_and_is_not_stored,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = ServerProc.start(tmp_path_factory.mktemp("pigeon-mqtt-ingest"), "--ingest", "mqtt")
    yield srv
    srv.stop()
