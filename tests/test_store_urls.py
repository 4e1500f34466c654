"""The store URLs: what each part means, and bad ones refused with a clear error that never
shows a password. Nothing here connects to a server."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from storage import BackendConfigError, cassandra_contact, cassandra_credentials, cassandra_tls, open_media, open_store


def test_credentials_are_read_percent_decoded() -> None:
    assert cassandra_credentials("cassandra://pigeon:s%40cr%3At@127.0.0.1:9042/ks") == ("pigeon", "s@cr:t")
    assert cassandra_credentials("cassandra://127.0.0.1:9042/ks") is None
    assert cassandra_contact("cassandra://u:p@h1:9142,h2:9142/ks") == (["h1", "h2"], 9142, "ks", ("u", "p"))
    assert cassandra_contact("cassandra://h1,h2/ks") == (["h1", "h2"], 9042, "ks", None)
    assert cassandra_contact("cassandra://[::1]:9142,[fe80::1]/ks") == (["::1", "fe80::1"], 9142, "ks", None)


@pytest.mark.parametrize("url", [
    "cassandra://secret-word@127.0.0.1/ks",  # a user without a password (or a password without its user)
    "cassandra://secret-word:@127.0.0.1/ks",
    "cassandra://:secret-word@127.0.0.1/ks",  # a password without a user
])
def test_half_a_credential_is_refused_not_dropped(url: str) -> None:
    with pytest.raises(BackendConfigError, match="USER:PASSWORD") as err:
        open_store(url)
    assert "secret-word" not in str(err.value)


@pytest.mark.parametrize(("url", "says"), [
    ("cassandra://pigeon:secret-word@127.0.0.1:nope/ks", "bad port"),
    ("cassandra://pigeon:secret-word@127.0.0.1:9042/", "needs hosts and a keyspace"),
    ("cassandra://pigeon:secret-word@127.0.0.1:9042/ks?inbox_ttl_days=x", "inbox_ttl_days"),
    ("cassandra://pigeon:secret-word@127.0.0.1:9042/ks?inbox_ttl_days=0", "inbox_ttl_days"),
    ("cassandra://pigeon:secret-word@127.0.0.1:9042/ks?writes=maybe", "writes must be"),
    ("casandra://pigeon:secret-word@127.0.0.1:9042/ks", "unknown store scheme"),
    # a password with an unencoded '/', '?' or '#' ends the host part early
    ("cassandra://pigeon:secret/word@127.0.0.1:9042/ks", "percent-encode"),
    ("cassandra://pigeon:secret?word@127.0.0.1:9042/ks", "needs hosts"),
    ("cassandra://pigeon:secret#word@127.0.0.1:9042/ks", "percent-encode"),
    ("cassandra://pigeon:secret-word@h1:9042,h2:9142/ks", "same port"),
    ("cassandra://pigeon:secret-word@[::1]x/ks", "bad port"),
    ("cassandra://pigeon:secret-word@h1,,h2/ks", "empty host"),
])
def test_a_bad_store_url_says_what_is_wrong_and_not_the_password(url: str, says: str) -> None:
    with pytest.raises(BackendConfigError, match=says) as err:
        open_store(url)
    assert "secret" not in str(err.value)


def test_a_bad_media_scheme_does_not_show_the_secret() -> None:
    with pytest.raises(BackendConfigError, match="unknown media scheme") as err:
        open_media("s4://access:secret-word@127.0.0.1:9000/bucket", secret=b"k" * 32, public_base="http://x")
    assert "secret-word" not in str(err.value)


def test_cassandras_checks_the_nodes_certificates_and_names() -> None:
    assert cassandra_tls("cassandra://127.0.0.1/ks") is None
    ctx = cassandra_tls("cassandras://u:p@127.0.0.1/ks")
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_ca_without_tls_or_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BackendConfigError, match="cassandras://"):
        open_store(f"cassandra://127.0.0.1/ks?ca={tmp_path / 'ca.pem'}")
    with pytest.raises(BackendConfigError, match="cannot be used"):
        open_store(f"cassandras://127.0.0.1/ks?ca={tmp_path / 'missing.pem'}")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(BackendConfigError, match="cannot be used"):
        open_store(f"cassandras://127.0.0.1/ks?ca={tmp_path / 'junk.pem'}")


def test_the_ca_path_is_decoded_once(tmp_path: Path) -> None:
    import certifi

    ca = tmp_path / "my+ca.pem"
    ca.write_bytes(Path(certifi.where()).read_bytes())
    assert cassandra_tls(f"cassandras://127.0.0.1/ks?ca={str(ca).replace('+', '%2B')}") is not None
