"""URI parsing and size parsing."""

import pytest

from vstore.errors import ConfigError
from vstore.sizes import format_size, parse_size
from vstore.uri import parse_uri, split_paths


def test_parse_size():
    assert parse_size("64K") == 65536
    assert parse_size("1G") == 1 << 30
    assert parse_size("1.5M") == 1536 * 1024
    assert parse_size("4096") == 4096
    assert format_size(65536) == "64K"
    for bad in ("", "abc", "-1", "1X", "0.3K"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_parse_uris():
    u = parse_uri("file:///srv/disk0.img")
    assert (u.scheme, u.path) == ("file", "/srv/disk0.img")
    u = parse_uri("memory://m0?size=1G")
    assert u.host == "m0" and u.params["size"] == "1G"
    u = parse_uri("nfs://127.0.0.1:2049/srv/nfst/d1.img")
    assert (u.host, u.port, u.path) == ("127.0.0.1", 2049, "/srv/nfst/d1.img")
    u = parse_uri("iscsi://bob%s3cret@127.0.0.1:3260/iqn.2026-11.test:disk1/1")
    assert (u.user, u.password) == ("bob", "s3cret")
    assert "s3cret" not in str(u) and "s3cret" not in repr(u)
    assert str(u) == "iscsi://bob%***@127.0.0.1:3260/iqn.2026-11.test:disk1/1"
    u = parse_uri("iscsi://bob:p%40ss@h/iqn.x:y/0")
    assert u.password == "p@ss" and str(u) == "iscsi://bob:***@h/iqn.x:y/0"
    paths = split_paths("iscsi://127.0.0.1/iqn.x:y/1,iscsi://127.0.0.2/iqn.x:y/1")
    assert [p.host for p in paths] == ["127.0.0.1", "127.0.0.2"]


@pytest.mark.parametrize(
    "bad",
    ["/no/scheme", "ftp://x/y", "file://relative", "memory://", "nfs://host/onlyexport",
     "iscsi://h/iqn", "iscsi://h/iqn/x", "iscsi://h:99999/iqn/1"],
)
def test_bad_uris(bad):
    with pytest.raises(ConfigError):
        parse_uri(bad)
