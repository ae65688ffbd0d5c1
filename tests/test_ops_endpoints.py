"""``--picker`` and ``--envoy`` naming every address of a DNS name (extproc.ops.endpoints), without servers:
a resolver of the test's own, and the system's for ``localhost``."""

from __future__ import annotations

import argparse
import io
from collections.abc import Sequence
from pathlib import Path

import pytest

from extproc.config import load_fleet
from extproc.ops import OpsError
from extproc.ops.endpoints import expand, system_resolver
from extproc.ops.execute import Ops
from extproc.ops.models import with_endpoints
from extproc.ops.status.command import run_cli as status_cli

REPO = Path(__file__).resolve().parent.parent


class Zone:
    """A resolver answering from a table the test changes, as pods come and go behind a headless Service."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.asked: list[tuple[str, int]] = []

    def __call__(self, name: str, port: int) -> Sequence[str]:
        self.asked.append((name, port))
        if name not in self.records:
            raise OSError(f"[Errno -2] {name}: Name or service not known")
        return self.records[name]


def test_plain_urls_are_kept_as_given() -> None:
    urls = ["http://10.0.0.9:9090", "http://picker-b:9090"]
    assert expand(urls, Zone({})) == urls


def test_a_dns_name_becomes_one_url_per_address() -> None:
    zone = Zone({"extproc-picker": ["10.0.0.12", "10.0.0.3", "fd00::7", "10.0.0.12"]})
    assert expand(["dns+http://extproc-picker:9090"], zone) == [
        "http://10.0.0.12:9090",
        "http://10.0.0.3:9090",
        "http://[fd00::7]:9090",
    ]
    assert zone.asked == [("extproc-picker", 9090)]


def test_scheme_and_path_are_kept_and_duplicates_dropped() -> None:
    zone = Zone({"gw": ["10.1.0.1"]})
    assert expand(["dns+https://gw:9901/admin", "https://10.1.0.1:9901/admin"], zone) == ["https://10.1.0.1:9901/admin"]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("dns+http://missing:9090", "missing does not resolve"),
        ("dns+http://empty:9090", "empty resolves to no address"),
        ("dns+http://extproc-picker", "expected dns+http://NAME:PORT"),
        ("dns+ftp://extproc-picker:21", "expected dns+http://NAME:PORT"),
    ],
)
def test_a_name_that_gives_no_endpoint_is_refused_with_the_url(url: str, problem: str) -> None:
    with pytest.raises(OpsError) as refused:
        expand([url], Zone({"empty": [], "extproc-picker": ["10.0.0.1"]}))
    assert url in str(refused.value)
    assert problem in str(refused.value)


def test_the_system_resolver_answers_for_localhost() -> None:
    assert "http://127.0.0.1:9090" in expand(["dns+http://localhost:9090"], system_resolver)


def test_with_endpoints_resolves_again_each_time() -> None:
    fleet = load_fleet(REPO / "deploy" / "local" / "fleet.yaml")
    args = argparse.Namespace(picker=["dns+http://localhost:9090"], envoy=["http://127.0.0.1:9901"])
    ops = with_endpoints(Ops(fleet, triton=None), args, drain=False)  # type: ignore[arg-type]
    assert [p.url for p in ops.pickers] == ["http://127.0.0.1:9090"]
    assert [e.url for e in ops.envoys] == ["http://127.0.0.1:9901"]


def test_status_refuses_a_name_that_does_not_resolve(capsys: pytest.CaptureFixture[str]) -> None:
    fleet = load_fleet(REPO / "deploy" / "local" / "fleet.yaml")
    args = argparse.Namespace(
        picker=["dns+http://nothing.invalid:9090"],
        envoy=None,
        no_envoy=True,
        timeout=1.0,
        watch=None,
        once=True,
        json=False,
        tier=None,
        state=None,
        model=None,
        sort="name",
        top=None,
    )
    assert status_cli(args, fleet, io.StringIO()) == 2
    assert "dns+http://nothing.invalid:9090: nothing.invalid does not resolve" in capsys.readouterr().err
