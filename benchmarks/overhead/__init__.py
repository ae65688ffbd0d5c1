"""``python -m benchmarks.overhead``: what the picker costs a request, against plain Envoy and a bare processor.

In one run, with one load generator, three (or four) variants of the gateway Envoy are measured side by side against
the same trivial upstream:

``plain``
    The gateway without the ext_proc filter (and without the picker cluster). Everything else stays,
    including the ``header_mutation`` filter, so the variants differ only by ext_proc.
``bare``
    The gateway + a bare grpc.aio processor that answers every request with a constant, precomputed
    ProcessingResponse (see :mod:`benchmarks.overhead.server`): the floor for any Python ext_proc service.
    ``--bare-answer routing`` makes that answer the picker's kind (tier and hosts headers, route cache
    cleared, naming every upstream host), so the bare gateway Envoy does the picker's routing work too and
    only the processor differs.
``picker``
    The gateway + the real picker request path (Processor, Scheduler, PickerMetrics, a Datastore of the
    upstream hosts whose telemetry is kept fresh; the telemetry collector's polling is off the request path
    and excluded, as there is no Triton behind the benchmark).
``epp`` (only with ``--epp``)
    The same picker in the Endpoint Picker Protocol (``picker.epp``'s dialect), behind the Envoy a GIE gateway
    builds (:func:`epp_bootstrap`, from :mod:`benchmarks.gateway`): ext_proc with both bodies
    FULL_DUPLEX_STREAMED through the picker and the response phases sent to it, the pool's ``override_host``
    cluster reading ``x-gateway-destination-endpoint`` from the ``envoy.lb`` metadata. It reaches the picker in
    plaintext over a Unix socket, as the other variants do, so the dialects differ and not the transports
    (``picker.epp`` serves TLS by default; its cost is not measured). Same upstream, same requests: the
    per-request cost of the gateway dialect against ours, in the same run.

The gateway configuration is rendered from a fleet of ``--hosts`` hosts by
:func:`extproc.envoy_config.render_bootstrap` and transformed per variant (:func:`variant_bootstrap`). The
upstream is a second Envoy answering every request with a ``direct_response`` 200 on one loopback port per
host (:func:`upstream_bootstrap`); it echoes the ``x-triton-lb-hosts`` header (and the EPP dialect's
``x-gateway-destination-endpoint``) back, which start-up uses to check that the picker really routes. Every
process (the four Envoys, both processors; five and three with ``--epp``) starts once and stays up; the phases
alternate the variants in rotating order, so machine noise hits all of them alike, and every ratio is quoted
from the same run.

Phases:

1. **Maximum sustained req/s**: ``wrk`` (closed loop, ``--connections`` connections, one thread) posting a
   small REST inference request to ``/v2/models/<model>/infer``, ``--rounds`` rounds of ``--max-duration``
   seconds per variant. Reported: the median over rounds, and the picker/bare ratio (median of the per-round
   ratios: a round's runs are back to back, seconds apart). Skipped, with a hint, when ``wrk`` is missing.
2. **Latency at fixed rates** (``--rates``, default 200, 500 and 1000 req/s): an open-loop, constant-rate
   generator (:class:`OpenLoop`: a sender thread with precise sleeps, a receiver thread on epoll, raw
   HTTP/1.1 keep-alive connections) measuring each request's latency from its *intended* send time, so a
   stalled system cannot hide queueing (coordinated omission). The generator's own scheduling lag (actual -
   intended send time) is reported next to the latencies. Per variant the headline p50/p99 is the median
   over rounds of each round's percentile; added latency is the median over rounds of (variant - plain) in
   the same round (a noise burst spoils one pair, not the result); pooled percentiles are in the JSON too.
   A rate above 95 % of a variant's best maximum-throughput round is not run for it ("not reachable"), and
   a run that fell behind (errors, fail-open, achieved rate < 95 % of the offered rate) is flagged "not
   sustained".
3. **CPU per request**: ``utime + stime`` of each process from ``/proc/<pid>/stat`` (all threads) over each
   phase, divided by the requests completed in it; the processor's is the "picker CPU µs/request". Each
   phase also records how many cores the machine spent on work that is not this benchmark (``/proc/stat``
   minus our processes): the "other" column, to judge how noisy a shared machine was.

Fail-open is watched: the gateway's ``http.ingress.ext_proc.*`` counters are read before and after every
phase, and a phase where the processor timed out or failed (Envoy then routes without it) is reported.

``--soak N`` runs a different mode: only the real picker's gateway (``--soak-variant bare`` for the bare
processor's), N requests (wrk at full speed, or the open-loop generator at ``--soak-rate`` without wrk), the
processor's RSS sampled about every 50k requests; prints the series, its max/min ratio and the growth in
bytes per request (least squares).

Progress goes to stderr, the table to stdout, the JSON to ``--output``.

The modules, by job: :mod:`~benchmarks.overhead.stack` (settings, fleet, the Envoy configurations),
:mod:`~benchmarks.overhead.server` (the two processors), :mod:`~benchmarks.overhead.bench` (start the stack,
run the phases), :mod:`~benchmarks.overhead.load` (the request, the open-loop generator, wrk),
:mod:`~benchmarks.overhead.measure` (/proc, Envoy counters, statistics), :mod:`~benchmarks.overhead.report`
(summaries, targets, tables) and :mod:`~benchmarks.overhead.cli` (the options and the whole run). This package
re-exports their public names.
"""

from benchmarks.loadgen import percentile
from benchmarks.overhead.bench import OverheadBench, Processes
from benchmarks.overhead.cli import (
    DEFAULT_OUTPUT,
    DEFAULT_SOAK_OUTPUT,
    add_arguments,
    main,
    run,
    run_from_args,
    settings_from_args,
)
from benchmarks.overhead.load import (
    NO_ANSWER,
    WRK_INSTALL_HINT,
    WRK_RESULT_PREFIX,
    OpenLoop,
    OpenLoopRecords,
    find_wrk,
    parse_response,
    parse_wrk_output,
    post,
    request_bytes,
    run_wrk,
    summarize_open_loop,
    wrk_script,
)
from benchmarks.overhead.measure import (
    GATEWAY_STATS,
    REACHABLE_FRACTION,
    added_latency,
    constant_rate_offsets,
    counter_delta,
    cpu_seconds,
    cpu_us_per_request,
    envoy_counters,
    gateway_stat_prefix,
    gateway_summary,
    latency_summary,
    machine_busy_seconds,
    median,
    own_cpu_seconds,
    parse_envoy_counters,
    parse_machine_cpu,
    parse_proc_stat,
    parse_statm_rss,
    reachable,
    rotated,
    round_ratios,
    rss_bytes,
)
from benchmarks.overhead.report import (
    NOTES,
    environment,
    evaluate_targets,
    format_report,
    format_soak,
    growth_per_request,
    json_safe,
    paired_added,
    settings_json,
    summarize_max,
    summarize_rate,
)
from benchmarks.overhead.stack import (
    ALL_VARIANTS,
    DEFAULT_RATES,
    ECHO_DESTINATION_HEADER,
    ECHO_HEADER,
    EPP_VARIANT,
    MODEL,
    PROCESSOR_VARIANTS,
    READY_LINE,
    REQUEST_BODY,
    VARIANTS,
    BenchError,
    Settings,
    bench_fleet,
    epp_bootstrap,
    http_filter_names,
    http_managers,
    point_picker_cluster,
    strip_ext_proc,
    upstream_bootstrap,
    variant_bootstrap,
)

__all__ = [
    "ALL_VARIANTS",
    "DEFAULT_OUTPUT",
    "DEFAULT_RATES",
    "DEFAULT_SOAK_OUTPUT",
    "ECHO_DESTINATION_HEADER",
    "ECHO_HEADER",
    "EPP_VARIANT",
    "GATEWAY_STATS",
    "MODEL",
    "NOTES",
    "NO_ANSWER",
    "PROCESSOR_VARIANTS",
    "REACHABLE_FRACTION",
    "READY_LINE",
    "REQUEST_BODY",
    "VARIANTS",
    "WRK_INSTALL_HINT",
    "WRK_RESULT_PREFIX",
    "BenchError",
    "OpenLoop",
    "OpenLoopRecords",
    "OverheadBench",
    "Processes",
    "Settings",
    "add_arguments",
    "added_latency",
    "bench_fleet",
    "constant_rate_offsets",
    "counter_delta",
    "cpu_seconds",
    "cpu_us_per_request",
    "environment",
    "envoy_counters",
    "epp_bootstrap",
    "evaluate_targets",
    "find_wrk",
    "format_report",
    "format_soak",
    "gateway_stat_prefix",
    "gateway_summary",
    "growth_per_request",
    "http_filter_names",
    "http_managers",
    "json_safe",
    "latency_summary",
    "machine_busy_seconds",
    "main",
    "median",
    "own_cpu_seconds",
    "paired_added",
    "parse_envoy_counters",
    "parse_machine_cpu",
    "parse_proc_stat",
    "parse_response",
    "parse_statm_rss",
    "parse_wrk_output",
    "percentile",
    "point_picker_cluster",
    "post",
    "reachable",
    "request_bytes",
    "rotated",
    "round_ratios",
    "rss_bytes",
    "run",
    "run_from_args",
    "run_wrk",
    "settings_from_args",
    "settings_json",
    "strip_ext_proc",
    "summarize_max",
    "summarize_open_loop",
    "summarize_rate",
    "upstream_bootstrap",
    "variant_bootstrap",
    "wrk_script",
]
