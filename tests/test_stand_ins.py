"""The HTTP stand-ins keep a record: every request for a path or method they do not serve is answered like the real
service answers it, lands in ``unknown_routes`` and fails the test that made it (the autouse fixture in
tests/conftest.py), unless the test acknowledged it with ``expect_unknown``."""

from __future__ import annotations

import http.client
import json
import textwrap
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import ROOT
from tests.stand_ins import StandIn, unknown_route_report
from tests.stand_ins.hf_hub import HubStandIn
from tests.stand_ins.lmstudio import LMStudioStandIn
from tests.stand_ins.slack import WEBHOOK_PATH, SlackReceiver
from tests.stand_ins.vastai import VastAIStandIn

pytest_plugins = ["pytester"]


def call(url: str, method: str, target: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One request with any method to the server at ``url``; its status and body."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, target, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# name -> (start the stand-in, [(method, target, body, status, body check)]): first an unknown method on a path the
# stand-in serves, then HEAD where it is not served, then an unknown path with a method it serves.
Case = tuple[str, str, bytes | None, int, Callable[[bytes], bool]]
CASES: dict[str, tuple[Callable[[Path], AbstractContextManager[Any]], list[Case]]] = {
    "hub": (lambda tmp: HubStandIn(), [
        ("PATCH", "/api/whoami-v2", b"{}", 404, lambda b: b"can't find the page" in b),
        ("OPTIONS", "/api/models/u/r", None, 404, lambda b: json.loads(b)["error"].startswith("Sorry")),
        ("GET", "/api/nowhere?x=1", None, 404, lambda b: b"/api/nowhere" in b),
    ]),
    "slack": (lambda tmp: SlackReceiver(), [
        ("PUT", WEBHOOK_PATH, b'{"text": "hi"}', 405, lambda b: b == b"invalid_method"),
        ("HEAD", WEBHOOK_PATH, None, 405, lambda b: b == b""),
        ("POST", "/services/T000/B000/OTHER", b"{}", 404, lambda b: b == b"no_service"),
    ]),
    "vastai": (lambda tmp: VastAIStandIn(), [
        ("DELETE", "/api/v0/instances/1/?owner=me", None, 405,
         lambda b: json.loads(b) == {"error": "method_not_allowed"}),
        ("HEAD", "/api/v0/instances/1/?owner=me", None, 405, lambda b: b == b""),
        ("GET", "/api/v0/machines/", None, 404, lambda b: json.loads(b) == {"error": "not_found"}),
    ]),
    "lmstudio": (lambda tmp: LMStudioStandIn(tmp / "models", tmp / "state.json"), [
        ("PUT", "/v1/models", b"{}", 200,
         lambda b: json.loads(b) == {"error": "Unexpected endpoint or method. (PUT /v1/models)"}),
        ("HEAD", "/v1/models", None, 200, lambda b: b == b""),
        ("GET", "/api/v0/models", None, 200,
         lambda b: json.loads(b) == {"error": "Unexpected endpoint or method. (GET /api/v0/models)"}),
    ]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_unknown_methods_and_paths_are_answered_and_recorded(name: str, tmp_path: Path) -> None:
    start, cases = CASES[name]
    with start(tmp_path) as stand_in:
        assert isinstance(stand_in, StandIn)
        for method, target, body, status, body_ok in cases:
            answer = call(stand_in.url, method, target, body)
            assert answer[0] == status and body_ok(answer[1]), (method, target, answer)
        recorded = [f"{method} {target}" for method, target, *_ in cases]
        assert stand_in.unknown_routes == recorded
    # What the autouse fixture reads after the test: it names the stand-in and every route, so it would fail the
    # test. Reading it consumes the record (that is why this test itself passes).
    report = unknown_route_report()
    assert report == [f"{stand_in!r}: {', '.join(recorded)}"]
    assert stand_in.unknown_routes == [] and unknown_route_report() == []


def test_served_routes_leave_no_record(tmp_path: Path) -> None:
    with SlackReceiver() as slack, VastAIStandIn() as vast, LMStudioStandIn(tmp_path / "m", tmp_path / "s") as lm:
        assert call(slack.url, "POST", WEBHOOK_PATH, b'{"text": "hi"}') == (200, b"ok")
        vast.add_instance("7")
        assert call(vast.url, "GET", "/api/v0/instances/7/?owner=me")[0] == 401  # no key: a known route all the same
        assert call(lm.url, "GET", "/v1/models")[0] == 200
        assert slack.unknown_routes == vast.unknown_routes == lm.unknown_routes == []
    assert unknown_route_report() == []


def test_expect_unknown_acknowledges_exactly_what_was_recorded() -> None:
    with SlackReceiver() as slack:
        call(slack.url, "GET", "/a")
        call(slack.url, "POST", "/b", b"{}")
        slack.expect_unknown("POST /b", "GET /a")  # any order
        assert slack.unknown_routes == []
        call(slack.url, "GET", "/c")
        with pytest.raises(AssertionError, match=r"recorded \['GET /c'\], the test expected \['GET /d'\]"):
            slack.expect_unknown("GET /d")
    assert unknown_route_report() == []  # expect_unknown cleared the record, even when it failed


def test_the_autouse_fixture_fails_the_test_that_hit_an_unknown_route(pytester: pytest.Pytester,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of its own with the project's fixture: an unacknowledged unknown route errors the test in teardown,
    naming the stand-in and the route; a module-scoped stand-in is checked after each of its tests, once."""
    pytester.makeconftest("from tests.conftest import pytest_sessionfinish, stand_ins_served_every_request  # noqa\n")
    pytester.makepyfile(test_inner=textwrap.dedent("""
        import http.client
        import pytest
        from tests.stand_ins.slack import SlackReceiver
        from tests.stand_ins.vastai import VastAIStandIn

        def post(url, path):
            port = int(url.split(":")[2].split("/")[0])
            conn = http.client.HTTPConnection("127.0.0.1", port)
            conn.request("POST", path, body=b"{}")
            conn.getresponse().read()
            conn.close()

        @pytest.fixture(scope="module")
        def vast():
            with VastAIStandIn() as stand_in:
                yield stand_in

        def test_hits_unknown():
            with SlackReceiver() as slack:
                post(slack.url, "/nowhere")

        def test_declares_it():
            with SlackReceiver() as slack:
                post(slack.url, "/nowhere")
                slack.expect_unknown("POST /nowhere")

        def test_module_scoped_first(vast):
            post(vast.url, "/api/v0/instances/1/")

        def test_module_scoped_second(vast):
            pass
    """))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=4, errors=2)
    result.stdout.fnmatch_lines([
        "*test_hits_unknown PASSED*", "*test_hits_unknown ERROR*",
        "*test_declares_it PASSED*",
        "*test_module_scoped_first PASSED*", "*test_module_scoped_first ERROR*",
        "*test_module_scoped_second PASSED*",
    ])
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_hits_unknown*", "*do not serve*",
                                 "SlackReceiver(http://127.0.0.1:*): POST /nowhere"])
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_module_scoped_first*", "*do not serve*",
                                 "VastAIStandIn(http://127.0.0.1:*): POST /api/v0/instances/1/"])
