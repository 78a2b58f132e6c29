#!/usr/bin/env bash
# tornet.sh: a private Tor network on 127.0.0.1, built from Debian's `tor` package.
#
#   tornet.sh up DIR                 generate keys + torrcs, start 3 authorities and 5 relays (2 exits)
#   tornet.sh wait DIR [TIMEOUT_S]   wait (bounded, default 90 s) until the consensus lists all 8 nodes Running
#   tornet.sh arti-config DIR        write DIR/arti.toml (arti-client config fragment for this network)
#   tornet.sh client DIR [TIMEOUT_S] start a C tor client, wait for "Bootstrapped 100%", print its SOCKS address
#   tornet.sh down DIR               stop every tor process this script started under DIR (idempotent)
#
# Environment:
#   TORNET_PORT_BASE   first port of the network (default 17000). The network uses BASE..BASE+49:
#                      authority i: ORPort BASE+i, DirPort BASE+10+i; relay j: ORPort BASE+20+j;
#                      client SocksPort BASE+40. Give two networks bases at least 50 apart.
#                      Read by `up` and remembered in DIR/ports; later subcommands use the stored value.
#   TORNET_OWNER_PID   optional: every tor started exits by itself once this process is gone
#                      (tor's __OwningControllerProcess), so a killed test run leaks no daemons.
#
# Every wait in this script is bounded; on failure it says what it waited for and shows the log tail.
set -euo pipefail

NAUTH=3
NRELAY=5
NEXIT=2              # relay0 .. relay(NEXIT-1) are exits
VOTE=20              # V3AuthVotingInterval (s). The C tor HS time period is 24*VOTE s on a
                     # TestingTorNetwork; arti must be told via hsdir_interval = 24*VOTE/60 min.
HSDIR_INTERVAL=$(( 24 * VOTE / 60 ))

die() { echo "tornet: error: $*" >&2; exit 1; }
log() { echo "tornet: $*" >&2; }

usage() {
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

ensure_tor() {
    if ! command -v tor >/dev/null 2>&1 || ! command -v tor-gencert >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || die "tor/tor-gencert not installed; run: apt-get install -y --no-install-recommends tor"
        log "installing tor from apt"
        apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tor >&2 \
            || die "apt-get install tor failed"
    fi
}

# waitfor SECS DESCRIPTION CMD...: run CMD every 0.2 s until it succeeds or SECS elapse.
waitfor() {
    local secs=$1 what=$2; shift 2
    local deadline=$(( $(date +%s%N) / 1000000 + secs * 1000 ))
    until "$@"; do
        if (( $(date +%s%N) / 1000000 >= deadline )); then
            log "timed out after ${secs}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

# True if something accepts TCP connections on 127.0.0.1:$1 (bash /dev/tcp; no extra tools needed).
port_in_use() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

load_ports() {
    local dir=$1
    [ -f "$dir/ports" ] || die "$dir is not a tornet directory (no $dir/ports; run 'up' first)"
    BASE=$(cat "$dir/ports")
}

node_dirs() { # all node dirs of a network, authorities first
    local dir=$1 i
    for ((i = 0; i < NAUTH; i++)); do echo "$dir/auth$i"; done
    for ((i = 0; i < NRELAY; i++)); do echo "$dir/relay$i"; done
}

# True if process $1 is the tor we started with $2/torrc (guards against PID reuse: we never
# signal a process that is not ours). A zombie has an empty cmdline and counts as gone.
pid_is_ours() {
    local pid=$1 nd=$2
    [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$nd/torrc"
}

# The PID of a node's tor, if that process is still ours. Read from started.pid, our own copy of
# tor's PID file: tor deletes its PidFile as soon as it begins shutting down, and a tor that
# then hangs on exit must still be found by the next `down`.
our_pid() {
    local nd=$1 pid f
    for f in "$nd/started.pid" "$nd/pid"; do [ -s "$f" ] && break; done
    [ -s "$f" ] || return 1
    pid=$(tr -dc '0-9' < "$f")
    [ -n "$pid" ] && pid_is_ours "$pid" "$nd" || return 1
    echo "$pid"
}

pid_gone() { ! pid_is_ours "$1" "$2"; }

common_torrc() {
    local nd=$1 nick=$2
    cat <<EOF
TestingTorNetwork 1
DataDirectory $nd
PidFile $nd/pid
RunAsDaemon 1
Nickname $nick
Log notice file $nd/notice.log
SafeLogging 0
LogTimeGranularity 1
ProtocolWarnings 1
ShutdownWaitLength 0
ConnDirectionStatistics 0
DirReqStatistics 0
AddressDisableIPv6 1
ClientUseIPv6 0
AssumeReachable 1
PathsNeededToBuildCircuits 0.67
TestingDirAuthVoteExit *
TestingDirAuthVoteHSDir *
TestingDirAuthVoteGuard *
TestingMinExitFlagThreshold 0
V3AuthNIntervalsValid 3
EOF
    if [ -n "${TORNET_OWNER_PID:-}" ]; then
        echo "__OwningControllerProcess $TORNET_OWNER_PID"
    fi
    cat "$(dirname "$nd")/dirauthorities"
}

start_tor() { # start_tor NODEDIR: tor daemonizes; wait (bounded) until its PID file exists
    local nd=$1
    if ! tor -f "$nd/torrc" --quiet >"$nd/start.out" 2>&1; then
        cat "$nd/start.out" >&2
        tail -n 20 "$nd/notice.log" >&2 2>/dev/null || true
        die "failed to start tor in $nd"
    fi
    waitfor 15 "$nd/pid" our_pid "$nd" >/dev/null || die "tor in $nd did not write its PID file"
    cp "$nd/pid" "$nd/started.pid"
}

cmd_up() {
    local dir=$1
    ensure_tor
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    local nd
    for nd in $(node_dirs "$dir") "$dir/client"; do
        if our_pid "$nd" >/dev/null; then die "a network is already running in $dir; run '$0 down $dir' first"; fi
    done
    BASE=${TORNET_PORT_BASE:-17000}
    [[ $BASE =~ ^[0-9]+$ ]] && (( BASE >= 1024 && BASE + 49 <= 65535 )) \
        || die "TORNET_PORT_BASE must be a number in 1024..65486, got '$BASE'"
    local p
    for p in $(seq "$BASE" $((BASE + 24))) $((BASE + 40)); do
        if port_in_use "$p"; then die "port 127.0.0.1:$p is in use; pick another TORNET_PORT_BASE"; fi
    done
    # Fresh keys every time: remove what an earlier network left (it is stopped, checked above).
    rm -rf "${dir:?}"/auth* "${dir:?}"/relay* "${dir:?}"/client "$dir/arti.toml" "$dir/dirauthorities"
    echo "$BASE" > "$dir/ports"

    local i orport dirport v3ident rsafp
    : > "$dir/dirauthorities"
    for ((i = 0; i < NAUTH; i++)); do
        nd="$dir/auth$i"; orport=$((BASE + i)); dirport=$((BASE + 10 + i))
        mkdir -p "$nd/keys"; chmod 700 "$nd"
        # Authority identity + signing key and certificate; the empty passphrase comes from stdin.
        echo "" | tor-gencert --create-identity-key --passphrase-fd 0 -m 12 -a "127.0.0.1:$dirport" \
            -i "$nd/keys/authority_identity_key" -s "$nd/keys/authority_signing_key" \
            -c "$nd/keys/authority_certificate" >"$nd/gencert.out" 2>&1 \
            || { cat "$nd/gencert.out" >&2; die "tor-gencert failed for auth$i"; }
        # Relay identity key + fingerprint file (tor exits right after writing them).
        tor --quiet --ignore-missing-torrc -f /dev/null --list-fingerprint --orport 1 \
            --datadirectory "$nd" >/dev/null 2>&1 || die "tor --list-fingerprint failed for auth$i"
        v3ident=$(awk '/^fingerprint /{print $2}' "$nd/keys/authority_certificate")
        rsafp=$(awk '{print $2}' "$nd/fingerprint")
        [ -n "$v3ident" ] && [ -n "$rsafp" ] || die "could not read the fingerprints of auth$i"
        echo "DirAuthority auth$i orport=$orport no-v2 v3ident=$v3ident 127.0.0.1:$dirport $rsafp" >> "$dir/dirauthorities"
    done

    for ((i = 0; i < NAUTH; i++)); do
        nd="$dir/auth$i"
        { common_torrc "$nd" "auth$i"; cat <<EOF
SocksPort 0
ORPort 127.0.0.1:$((BASE + i))
DirPort 127.0.0.1:$((BASE + 10 + i))
Address 127.0.0.1
ContactInfo auth$i@tornet.invalid
AuthoritativeDirectory 1
V3AuthoritativeDirectory 1
ExitRelay 0
ExitPolicy reject *:*
TestingV3AuthInitialVotingInterval $VOTE
TestingV3AuthInitialVoteDelay 4
TestingV3AuthInitialDistDelay 4
V3AuthVotingInterval $VOTE
V3AuthVoteDelay 4
V3AuthDistDelay 4
EOF
        } > "$nd/torrc"
    done
    for ((i = 0; i < NRELAY; i++)); do
        nd="$dir/relay$i"; mkdir -p "$nd"; chmod 700 "$nd"
        { common_torrc "$nd" "relay$i"; cat <<EOF
SocksPort 0
ORPort 127.0.0.1:$((BASE + 20 + i))
Address 127.0.0.1
ContactInfo relay$i@tornet.invalid
EOF
          if (( i < NEXIT )); then
              # accept *:* (not 127.0.0.0/8): the microdescriptor policy summary only covers public
              # addresses, so a loopback-only policy would look like "no exit" to arti.
              printf 'ExitRelay 1\nExitPolicyRejectPrivate 0\nExitPolicyRejectLocalInterfaces 0\nExitPolicy accept *:*\n'
          else
              printf 'ExitRelay 0\nExitPolicy reject *:*\n'
          fi
        } > "$nd/torrc"
    done

    for nd in $(node_dirs "$dir"); do start_tor "$nd"; done
    log "started $NAUTH authorities and $NRELAY relays ($NEXIT exits) in $dir, ports $BASE..$((BASE + 24))"
}

# Count entries flagged Running in a microdesc consensus file (0 if missing).
count_running() {
    [ -f "$1" ] || { echo 0; return; }
    grep -c '^s .*\bRunning\b' "$1" || true
}

check_alive() {
    local dir=$1 nd
    for nd in $(node_dirs "$dir"); do
        if ! our_pid "$nd" >/dev/null; then
            tail -n 15 "$nd/notice.log" >&2 2>/dev/null || true
            die "tor in $nd is not running (log tail above)"
        fi
    done
}

# Complete = every node (authorities, and relays, which are the directory caches clients ask)
# holds a consensus listing all nodes Running. Checking only the authorities lets a client
# start on a cache's older, partial consensus and sit there for a voting interval.
consensus_complete() {
    local dir=$1 nd n
    check_alive "$dir"
    for nd in $(node_dirs "$dir"); do
        n=$(count_running "$nd/cached-microdesc-consensus")
        (( n >= NAUTH + NRELAY )) || return 1
    done
}

# Complete = each authority holds a consensus listing all nodes Running. (Relays, the other
# directory caches, pick it up later, some only 20-25 s later; so arti.toml names only the
# authorities as fallback caches and clients bootstrap from the complete consensus at once.)
consensus_complete() {
    local dir=$1 i n
    check_alive "$dir"
    for ((i = 0; i < NAUTH; i++)); do
        n=$(count_running "$dir/auth$i/cached-microdesc-consensus")
        (( n >= NAUTH + NRELAY )) || return 1
    done
}

cmd_wait() {
    local dir=$1 timeout=${2:-90}
    load_ports "$dir"
    [[ $timeout =~ ^[0-9]+$ ]] || die "TIMEOUT_S must be a whole number of seconds"
    local t0=$SECONDS
    if ! waitfor "$timeout" "a consensus listing all $((NAUTH + NRELAY)) nodes Running" consensus_complete "$dir"; then
        local i
        for ((i = 0; i < NAUTH; i++)); do
            log "auth$i consensus: $(count_running "$dir/auth$i/cached-microdesc-consensus") of $((NAUTH + NRELAY)) Running"
        done
        tail -n 8 "$dir/auth0/notice.log" >&2 2>/dev/null || true
        die "network in $dir not ready after ${timeout}s"
    fi
    log "consensus lists all $((NAUTH + NRELAY)) nodes Running (waited $((SECONDS - t0)) s)"
}

cmd_arti_config() {
    local dir=$1
    load_ports "$dir"
    dir=$(cd "$dir" && pwd)
    local nd i v3 rsa ed v3s="" ups="" fbs=""
    for ((i = 0; i < NAUTH; i++)); do
        nd="$dir/auth$i"
        # tor writes fingerprint-ed25519 shortly after it starts.
        waitfor 20 "$nd/fingerprint-ed25519" test -s "$nd/fingerprint-ed25519" \
            || die "no ed25519 fingerprint for $nd (is the network up?)"
    done
    for ((i = 0; i < NAUTH; i++)); do
        v3=$(awk '/^fingerprint /{print $2}' "$dir/auth$i/keys/authority_certificate")
        v3s+="${v3s:+, }\"$v3\""
        ups+="${ups:+, }[\"127.0.0.1:$((BASE + 10 + i))\"]"
    done
    # Fallback caches: the authorities only. They have the complete consensus first (that is
    # what `wait` checks); a relay may still serve an older, partial one for ~20 s, and an arti
    # client that bootstraps from it cannot build circuits until the next consensus.
    for ((i = 0; i < NAUTH; i++)); do
        nd="$dir/auth$i"
        rsa=$(awk '{print $2}' "$nd/fingerprint")
        ed=$(awk '{print $2}' "$nd/fingerprint-ed25519")
        [ -n "$rsa" ] && [ -n "$ed" ] || die "empty fingerprint in $nd"
        fbs+="    { rsa_identity = \"$rsa\", ed_identity = \"$ed\", orports = [\"127.0.0.1:$((BASE + i))\"] },"$'\n'
    done
    cat > "$dir/arti.toml.tmp" <<EOF
# arti-client configuration for the private Tor network in $dir (written by tornet.sh).
# Merge over arti's defaults; storage paths are set by the program.

[tor_network]
authorities = { v3idents = [$v3s], uploads = [$ups], downloads = [$ups], votes = [$ups] }
fallback_caches = [
$fbs]

[path_rules]
# Every relay is on 127.0.0.1: without this, arti treats them all as one family and
# cannot build a 3-hop circuit.
ipv4_subnet_family_prefix = 33
ipv6_subnet_family_prefix = 129

[address_filter]
# Exits must be allowed to connect to 127.0.0.1 targets.
allow_local_addrs = true

[override_net_params]
# C tor on a TestingTorNetwork uses an onion-service time period of 24 voting intervals
# (24 * ${VOTE} s = ${HSDIR_INTERVAL} min) without publishing it; arti defaults to 1440 min, and
# then never finds any onion service.
hsdir_interval = $HSDIR_INTERVAL

[storage.permissions]
# Test state lives in temp dirs that fs-mistrust would reject.
dangerously_trust_everyone = true
EOF
    mv "$dir/arti.toml.tmp" "$dir/arti.toml"
    echo "$dir/arti.toml"
}

cmd_client() {
    local dir=$1 timeout=${2:-60}
    load_ports "$dir"
    dir=$(cd "$dir" && pwd)
    local nd="$dir/client" socks="127.0.0.1:$((BASE + 40))"
    if ! our_pid "$nd" >/dev/null; then
        if port_in_use $((BASE + 40)); then die "SOCKS port $socks is in use"; fi
        rm -rf "$nd"; mkdir -p "$nd"; chmod 700 "$nd"
        { common_torrc "$nd" client; echo "SocksPort $socks"; } > "$nd/torrc"
        start_tor "$nd"
    fi
    if ! waitfor "$timeout" "the C tor client to bootstrap" grep -q 'Bootstrapped 100%' "$nd/notice.log"; then
        tail -n 8 "$nd/notice.log" >&2 2>/dev/null || true
        die "C tor client in $nd did not reach Bootstrapped 100% within ${timeout}s"
    fi
    echo "$socks"
}

# True once none of the "pid:nodedir" entries in the array PIDS is still our tor.
all_gone() {
    local entry
    for entry in "${PIDS[@]}"; do
        if pid_is_ours "${entry%%:*}" "${entry#*:}"; then return 1; fi
    done
}

cmd_down() {
    local dir=$1
    [ -d "$dir" ] || { log "nothing to stop: $dir does not exist"; return 0; }
    local nd pid entry killed=0
    PIDS=()
    for nd in "$dir"/auth* "$dir"/relay* "$dir"/client; do
        [ -d "$nd" ] || continue
        if pid=$(our_pid "$nd"); then
            kill -TERM "$pid" 2>/dev/null || true
            PIDS+=("$pid:$nd")
        fi
    done
    # tor 0.4.9 sometimes hangs in its exit path (seen: authorities deadlocked in
    # cpuworker_free_all after SIGTERM), so whatever is still there after 3 s gets SIGKILL.
    if ! waitfor 3 "tor processes to exit" all_gone 2>/dev/null; then
        for entry in "${PIDS[@]}"; do
            pid=${entry%%:*}; nd=${entry#*:}
            if pid_is_ours "$pid" "$nd"; then kill -KILL "$pid" 2>/dev/null || true; killed=$((killed + 1)); fi
        done
        waitfor 5 "tor processes to die after SIGKILL" all_gone || die "could not stop every tor in $dir"
    fi
    local note=""
    (( killed == 0 )) || note=" ($killed hung on exit and needed SIGKILL)"
    log "stopped ${#PIDS[@]} tor process(es) in $dir$note"
}

[ $# -ge 2 ] || usage
cmd=$1; dir=$2; shift 2
# Absolute paths: they are how our_pid recognises our processes (tor's command line holds the torrc path).
if [ -d "$dir" ]; then dir=$(cd "$dir" && pwd); fi
case "$cmd" in
    up)          cmd_up "$dir" ;;
    wait)        cmd_wait "$dir" "$@" ;;
    arti-config) cmd_arti_config "$dir" ;;
    client)      cmd_client "$dir" "$@" ;;
    down)        cmd_down "$dir" ;;
    *)           usage ;;
esac
