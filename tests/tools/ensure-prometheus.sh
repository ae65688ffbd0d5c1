#!/bin/sh
# Installs Debian's prometheus package (prometheus and promtool) when either is missing:
# tests/test_prometheus.py runs both. `make test` calls this; it does nothing when they are installed.
set -eu

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-prometheus: prometheus/promtool missing and no apt-get: install Prometheus 2.x yourself" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "ensure-prometheus: prometheus/promtool missing; run as root: apt-get install prometheus" >&2
        exit 1
    fi
    SUDO="sudo -n"
fi

echo "ensure-prometheus: installing Debian's prometheus package (for tests/test_prometheus.py)"
# The package starts a prometheus service where it can, on port 9090: the picker's metrics port in
# `make run`. The tests start their own Prometheus, so forbid the service start (policy-rc.d, which
# invoke-rc.d and deb-systemd-invoke obey) unless a policy is already in place, and disable the unit after.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
    trap '$SUDO rm -f "$POLICY"' EXIT
fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
if command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable prometheus.service >/dev/null 2>&1 || true
fi
command -v promtool >/dev/null && command -v prometheus >/dev/null
