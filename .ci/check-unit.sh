#!/usr/bin/env bash
# Check deploy/bitsync.service with `systemd-analyze verify` (and print its
# `systemd-analyze security` exposure score), without touching the system:
# the unit is copied to a temp dir with /usr/local/bin/bitsync rewritten to a
# binary that exists (BITSYNC_BIN, else target/{release,debug}/bitsync, else a
# stub script), since verify checks that ExecStart= and ExecStartPre= exist.
#
# Installs Debian's `systemd` package first if systemd-analyze is missing.
# Fails if verify exits non-zero or prints any warning about the unit.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
unit="$repo/deploy/bitsync.service"

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-unit: systemd-analyze not found; installing Debian's systemd package" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

bin="${BITSYNC_BIN:-}"
if [ -z "$bin" ]; then
    for b in "$repo/target/release/bitsync" "$repo/target/debug/bitsync"; do
        if [ -x "$b" ]; then bin="$b"; break; fi
    done
fi
if [ -z "$bin" ]; then
    bin="$tmp/bin/bitsync"
    mkdir -p "$tmp/bin"
    printf '#!/bin/sh\nexit 0\n' >"$bin"
    chmod 755 "$bin"
    echo "check-unit: no built bitsync binary; using a stub for ExecStart" >&2
fi
case "$bin" in
    *[[:space:]#]*) echo "check-unit: binary path must not contain spaces or '#': $bin" >&2; exit 2 ;;
esac

sed "s#/usr/local/bin/bitsync#$bin#g" "$unit" >"$tmp/bitsync.service"

echo "check-unit: systemd-analyze verify $(basename "$unit") (ExecStart -> $bin)"
set +e
out="$(SYSTEMD_LOG_LEVEL=notice systemd-analyze verify --man=no "$tmp/bitsync.service" 2>&1)"
rc=$?
set -e
# Lines about other units (the host's own, in a container) are not ours to judge.
ours="$(printf '%s\n' "$out" | grep -F 'bitsync.service' || true)"
if [ -n "$out" ]; then printf '%s\n' "$out" | sed 's/^/  /'; fi
if [ "$rc" -ne 0 ] || [ -n "$ours" ]; then
    echo "check-unit: FAILED (exit $rc)" >&2
    exit 1
fi

if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
    score="$(systemd-analyze security --offline=true --no-pager "$tmp/bitsync.service" 2>/dev/null \
        | sed -n 's/.*Overall exposure level for bitsync.service: \([0-9.]*\).*/\1/p')"
    [ -n "$score" ] && echo "check-unit: systemd-analyze security exposure: $score (0 = locked down, 10 = exposed)"
fi
echo "check-unit: ok"
