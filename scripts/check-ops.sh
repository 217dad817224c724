#!/usr/bin/env bash
# Checks of the operations files that need no running service: the systemd unit
# (systemd-analyze verify, and the exposure score where supported), the Prometheus alert
# rules (promtool check + unit tests), and that the binary links only the libraries the
# container image installs. Usage: scripts/check-ops.sh [path/to/outboxd]
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(realpath "${1:-target/debug/outboxd}")"
[[ -x "$bin" ]] || { echo "check-ops: no binary at $bin (build first)" >&2; exit 1; }
failed=0

# systemd unit, with ExecStart pointing at this build.
if command -v systemd-analyze >/dev/null 2>&1; then
    dir="$(mktemp -d)"
    sed "s#/usr/local/bin/outboxd#$bin#g" systemd/outboxd.service >"$dir/outboxd.service"
    if systemd-analyze verify "$dir/outboxd.service"; then
        echo "check-ops: systemd unit verifies"
    else
        echo "check-ops: systemd-analyze verify failed" >&2; failed=1
    fi
    if score="$(systemd-analyze security --offline=true "$dir/outboxd.service" 2>/dev/null | grep 'Overall exposure level')"; then
        echo "check-ops: $score"
    else
        echo "check-ops: this systemd cannot score units offline; skipped"
    fi
    rm -rf "$dir"
else
    echo "check-ops: systemd-analyze not installed; unit not verified" >&2; failed=1
fi

# Prometheus rules.
if command -v promtool >/dev/null 2>&1; then
    (cd config && promtool check rules prometheus-alerts.yml && promtool test rules prometheus-alerts.test.yml) \
        || { echo "check-ops: promtool failed" >&2; failed=1; }
else
    echo "check-ops: promtool not installed (Debian package prometheus)" >&2; failed=1
fi

# Shared libraries: only those the runtime image installs (libc6, libgcc-s1, libssl3, zlib1g).
allowed='^(linux-vdso|libc|libm|libgcc_s|libssl|libcrypto|libz|ld-linux-x86-64|libpthread|libdl|librt)\.so'
unexpected="$(ldd "$bin" | awk '{print $1}' | sed 's#.*/##' | grep -Ev "$allowed" || true)"
if [[ -n "$unexpected" ]]; then
    echo "check-ops: the binary needs libraries the image does not install: $unexpected" >&2; failed=1
else
    echo "check-ops: linked libraries: $(ldd "$bin" | awk '{print $1}' | sed 's#.*/##' | tr '\n' ' ')"
fi
exit "$failed"
