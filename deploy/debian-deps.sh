#!/usr/bin/env bash
# Install the Debian packages given as arguments if any is missing.
# Used by `make test` and `make demo` so both work on a fresh Debian machine.
set -euo pipefail
missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Services that come with test packages stay off for good (disabled and masked, also
# for the next boot): the tests start their own instances, on loopback inside their
# own namespaces with their own config, and nothing may listen on the host.
keep_services_off() {
    for svc in prometheus; do
        dpkg-query -W -f='${Status}' "$svc" 2>/dev/null | grep -q "install ok installed" || continue
        [ -L "/etc/systemd/system/$svc.service" ] && continue  # masked already
        $SUDO systemctl --no-reload disable "$svc.service" >/dev/null 2>&1 || true
        $SUDO systemctl --no-reload mask "$svc.service" >/dev/null 2>&1 || true
        $SUDO systemctl stop "$svc.service" >/dev/null 2>&1 || true
    done
}

if [ ${#missing[@]} -eq 0 ]; then
    keep_services_off
    exit 0
fi
echo "installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# No package may start its own service while installed (Debian's prometheus would
# listen on every interface): a policy-rc.d that answers 101 forbids the starts
# that invoke-rc.d and deb-systemd-invoke would do. The tests start what they need.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 0755 "$POLICY"
    trap '$SUDO rm -f "$POLICY"' EXIT
fi
$SUDO apt-get update -qq || true
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
keep_services_off
