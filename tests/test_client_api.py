"""The client-API allow-list as the picker applies it (its Endpoint Picker listener) agrees with the routes
our Envoy config renders from the same tables: for each request below, the rendered route Envoy would
match (first match wins, as Envoy's route table does) answers what :class:`extproc.client_api.ClientApi`
answers."""

from __future__ import annotations

import re
from typing import Any

import pytest

from extproc.client_api import GRPC_ALLOWED_METHODS, ClientApi
from extproc.config import Fleet, parse_fleet
from extproc.envoy_config.routes import _route_configuration

PATHS = [
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/health/other",
    "/v2/models/m",
    "/v2/models/m/versions/2",
    "/v2/models/m/config",
    "/v2/models/m/ready",
    "/v2/models/m/versions/2/infer",
    "/v2/models/m/infer",
    "/v2/models/m/generate",
    "/v2/models/stats",
    "/v2/models/m/stats",
    "/v2/models/m/versions/1/stats",
    "/v2/models/m/trace/setting",
    "/v2/trace/setting",
    "/v2/logging",
    "/v2/repository/index",
    "/v2/repository/models/m/load",
    "/v2/systemsharedmemory/status",
    "/v2/cudasharedmemory/region/r/register",
    "/v2x",
    "/admin",
    "/",
    *(
        f"/inference.GRPCInferenceService/{method}"
        for method in (
            *GRPC_ALLOWED_METHODS,
            "ModelStatistics",
            "RepositoryIndex",
            "RepositoryModelLoad",
            "RepositoryModelUnload",
            "SystemSharedMemoryRegister",
            "CudaSharedMemoryStatus",
            "LogSettings",
            "TraceSetting",
            "Unknown",
        )
    ),
]
HEADERS = [{}, {"content-encoding": "gzip"}, {"content-encoding": "identity"}, {"grpc-encoding": "gzip"}]


def fleet(allow_statistics: bool, allow_grpc_compression: bool) -> Fleet:
    return parse_fleet(
        {
            "hosts": [{"name": "h", "address": "10.0.0.1", "tier": "gpu"}],
            "envoy": {"allow_statistics": allow_statistics, "allow_grpc_compression": allow_grpc_compression},
        }
    )


def _header_matches(matcher: dict[str, Any], headers: dict[str, str]) -> bool:
    value = headers.get(matcher["name"])
    if "presentMatch" in matcher:
        return (value is not None) == bool(matcher["presentMatch"])
    if value is None:  # Envoy: an absent header matches no matcher, inverted or not
        return False
    if "rangeMatch" in matcher:
        bounds = matcher["rangeMatch"]
        matched = int(bounds["start"]) <= int(value) < int(bounds["end"])
    else:
        expected = matcher["stringMatch"]["exact"]
        matched = value.lower() == expected.lower() if matcher["stringMatch"].get("ignoreCase") else value == expected
    return matched != bool(matcher.get("invertMatch", False))


def envoy_answer(routes: list[dict[str, Any]], path: str, headers: dict[str, str]) -> int | None:
    """The status of the direct answer Envoy's route table gives, None where it routes to a cluster."""
    for entry in routes:
        match = entry["match"]
        if "prefix" in match:
            hit = path.startswith(match["prefix"])
        elif "path" in match:
            hit = path == match["path"]
        elif "pathSeparatedPrefix" in match:
            prefix = match["pathSeparatedPrefix"]
            hit = path == prefix or path.startswith(prefix + "/")
        else:
            hit = re.fullmatch(match["safeRegex"]["regex"], path) is not None
        hit = hit and all(_header_matches(m, headers) for m in match.get("headers", []))
        if "grpc" in match:
            hit = hit and headers.get("content-type", "").startswith("application/grpc")
        if hit:
            return None if "route" in entry else int(entry["directResponse"]["status"])
    raise AssertionError(f"no route for {path}")


@pytest.mark.parametrize("allow_statistics", [False, True])
@pytest.mark.parametrize("allow_grpc_compression", [False, True])
@pytest.mark.parametrize("extra", HEADERS)
def test_the_picker_answers_what_our_envoy_answers(
    allow_statistics: bool, allow_grpc_compression: bool, extra: dict[str, str]
) -> None:
    config = fleet(allow_statistics, allow_grpc_compression)
    routes = _route_configuration(config).to_dict()["virtualHosts"][0]["routes"]
    api = ClientApi(allow_statistics=allow_statistics, allow_grpc_compression=allow_grpc_compression)
    for path in PATHS:
        headers = {"content-length": "10", **extra}
        if path.startswith("/inference."):
            headers["content-type"] = "application/grpc"
        refusal = api.refusal(path, headers)
        assert envoy_answer(routes, path, headers) == (None if refusal is None else refusal.status), (path, headers)


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/x/../../repository/index",
        "/v2/models/./ready",
        "/v2//repository/index",
        "/v2/models/..%2Frepository%2Findex",
        "/v2/models/m%5c/ready",
        "/v2/models/m%00/ready",
        "/v2/models/m\\..\\ready",
    ],
)
def test_paths_envoy_would_normalise_or_reject_are_refused(path: str) -> None:
    """Envoy's listeners reject escaped slashes and NULs and resolve dot segments before routing; where a
    gateway does not, the picker refuses the path rather than check one Triton may read otherwise."""
    refusal = ClientApi(allow_statistics=False, allow_grpc_compression=False).refusal(path, {})
    assert refusal is not None and refusal.status == 400


def test_a_query_string_is_not_part_of_the_path() -> None:
    api = ClientApi(allow_statistics=False, allow_grpc_compression=False)
    assert api.refusal("/v2/models/m/infer?x=/v2/repository", {}) is None
    refusal = api.refusal("/v2/repository/index?x=1", {})
    assert refusal is not None and refusal.status == 403
