"""The fleet as the picker and Envoy see it: clients for the picker's HTTP endpoint (``/status``, drain,
undrain) and Envoy's admin ``/clusters``, and ``extproc status``, a table of hosts refreshed in place.

The modules, by job: :mod:`~extproc.ops.status.clients` (the picker's and Envoy's endpoints, behind small
client interfaces), :mod:`~extproc.ops.status.snapshot` (asking them all at once),
:mod:`~extproc.ops.status.rows` (a row per host: its state, the view's filters and order, the sums),
:mod:`~extproc.ops.status.render` (the text and the JSON), :mod:`~extproc.ops.status.text` (tables and lines
within a width, shared with ``extproc models``) and :mod:`~extproc.ops.status.command` (the command).
"""

from extproc.ops.status.clients import (
    DEFAULT_HTTP_TIMEOUT_S,
    OVERLOADED_S,
    EnvoyApi,
    EnvoyError,
    EnvoyHost,
    HttpEnvoyAdmin,
    HttpPicker,
    ModelBatching,
    ModelLoad,
    PickerApi,
    PickerError,
    PickerHost,
    PickerStatus,
    default_envoy_admin_url,
    default_picker_url,
    envoy_hosts,
    parse_overload,
    parse_picker_status,
)
from extproc.ops.status.command import CLEAR, run_cli, run_status
from extproc.ops.status.render import render, snapshot_json
from extproc.ops.status.rows import (
    DEFAULT_WIDTH,
    HostRow,
    View,
    host_rows,
    host_state,
    select,
    summaries,
    summarize,
)
from extproc.ops.status.snapshot import Snapshot, collect, snapshot_ok
from extproc.ops.status.text import fit_frame, fit_lines, fit_list, format_table

__all__ = [
    "CLEAR",
    "DEFAULT_HTTP_TIMEOUT_S",
    "DEFAULT_WIDTH",
    "OVERLOADED_S",
    "EnvoyApi",
    "EnvoyError",
    "EnvoyHost",
    "HostRow",
    "HttpEnvoyAdmin",
    "HttpPicker",
    "ModelBatching",
    "ModelLoad",
    "PickerApi",
    "PickerError",
    "PickerHost",
    "PickerStatus",
    "Snapshot",
    "View",
    "collect",
    "default_envoy_admin_url",
    "default_picker_url",
    "envoy_hosts",
    "fit_frame",
    "fit_lines",
    "fit_list",
    "format_table",
    "host_rows",
    "host_state",
    "parse_overload",
    "parse_picker_status",
    "render",
    "run_cli",
    "run_status",
    "select",
    "snapshot_json",
    "snapshot_ok",
    "summaries",
    "summarize",
]
