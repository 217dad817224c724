#!/usr/bin/env bash
# Builds the container image from the project's Dockerfile with podman (no Docker engine
# needed) and runs it as a user would: host network, the config mounted read-only, a
# read-only root filesystem, the host's PostgreSQL (through a proxy this script can cut)
# and a mock Kafka broker. Checks, each failing the script:
#   - the container runs as the Dockerfile's non-root user;
#   - the image bakes in no configuration and no secret (environment, layers);
#   - the root filesystem is read-only;
#   - HEALTHCHECK succeeds once ready, fails while the database is unreachable, and
#     recovers;
#   - the relay publishes a backlog and the consumer half handles it, counted by event id;
#   - PID 1 (tini) reaps the orphans of command handlers: no zombies after 200 calls,
#     while outboxd alone as PID 1 leaves them (the check can fail);
#   - `podman stop` (SIGTERM) drains and exits 0 within shutdown_timeout;
#   - the image's size is printed.
#
# Base images: no registry is reachable here, so `debian:bookworm-slim` is made with
# debootstrap and `rust:1-bookworm` from it with this machine's Rust toolchain (and its CA
# certificates, for the crate registry behind its proxy). Both stay in podman's store, and
# the Dockerfile's cache mounts keep crates and build output, so later runs build little.
#
# Needs root. PostgreSQL: $DATABASE_URL's server (default 127.0.0.1:5432, database test).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'check-image: %s\n' "$*"; }
fail() { printf 'check-image: FAILED: %s\n' "$*" >&2; exit 1; }

missing=()
for tool in podman runc debootstrap socat; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

database_url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
work="$(mktemp -d /tmp/outboxd-image.XXXXXX)"
# podman 4.3 here: crun refuses this machine's hybrid cgroups and the default ulimits are
# not permitted inside the sandbox.
cat > "$work/containers.conf" <<'EOF'
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
EOF
export CONTAINERS_CONF="$work/containers.conf"
pm() { podman --runtime runc "$@"; }

pids=()
containers=()
table=""
cleanup() {
    for c in "${containers[@]}"; do pm rm -f "$c" >/dev/null 2>&1 || true; done
    [[ -z "$table" ]] || psql "$database_url" -qAtc "DROP TABLE IF EXISTS $table" >/dev/null 2>&1 || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# --- base images -----------------------------------------------------------------------
cache=/var/cache/outboxd-image
if ! pm image exists debian:bookworm-slim; then
    log "making debian:bookworm-slim with debootstrap"
    mkdir -p "$cache"
    rm -rf "$cache/rootfs"
    debootstrap --variant=minbase bookworm "$cache/rootfs" http://deb.debian.org/debian >/dev/null
    # As in Docker Hub's debian-slim: no downloaded packages, package lists or apt caches
    # kept, and no documentation installed.
    rm -rf "$cache"/rootfs/var/cache/apt/archives/*.deb "$cache"/rootfs/var/lib/apt/lists/* \
        "$cache"/rootfs/usr/share/doc/* "$cache"/rootfs/usr/share/man/* "$cache"/rootfs/usr/share/info/*
    cat > "$cache/rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    cat > "$cache/rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
    tar -C "$cache/rootfs" -c . | pm import - debian:bookworm-slim >/dev/null
fi
rustc_version="$(rustc --version)"
if [[ "$(pm image inspect --format '{{index .Labels "rustc"}}' rust:1-bookworm 2>/dev/null || true)" != "$rustc_version" ]]; then
    log "making rust:1-bookworm with this machine's toolchain ($rustc_version)"
    ctx="$work/rust"
    mkdir -p "$ctx/ca"
    cp /usr/local/share/ca-certificates/*.crt "$ctx/ca/" 2>/dev/null || true
    cat > "$ctx/Containerfile" <<EOF
FROM debian:bookworm-slim
RUN apt-get update \\
 && apt-get install -y --no-install-recommends build-essential pkg-config libssl-dev zlib1g-dev ca-certificates perl python3 \\
 && rm -rf /var/lib/apt/lists/*
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates \\
 && mkdir -p /usr/local/rust /usr/local/cargo && cp -a /host-rust/bin /host-rust/lib /usr/local/rust/
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL rustc="$rustc_version"
EOF
    pm build --network=host -v "$(rustc --print sysroot):/host-rust:ro" -t rust:1-bookworm "$ctx" >/dev/null
fi

# --- the image -------------------------------------------------------------------------
log "building the image from the Dockerfile"
started=$SECONDS
# Docker format keeps HEALTHCHECK (OCI images have no field for it).
pm build --format docker --network=host -t outboxd:check . > "$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log" >&2; fail "podman build"; }
pm image prune -f >/dev/null 2>&1 || true # earlier builds' untagged layers
size=$(pm image inspect --format '{{.Size}}' outboxd:check)
log "built in $((SECONDS - started)) s; image size $((size / 1024 / 1024)) MiB"

# Nothing secret or site-specific baked in: the environment is PATH and the listen address.
env_names=$(pm image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' outboxd:check | cut -d= -f1 | grep -v '^$' | sort | tr '\n' ' ')
[[ "$env_names" == "OUTBOXD_HTTP__LISTEN PATH " ]] || fail "image environment is '$env_names'"
if pm history --no-trunc --format '{{.CreatedBy}}' outboxd:check | grep -qiE 'password|secret|token|DATABASE__URL'; then
    fail "a layer's command mentions a secret"
fi
[[ "$(pm image inspect --format '{{.Config.User}}' outboxd:check)" == "10001:10001" ]] || fail "image user"
pm run --rm --network=host --read-only outboxd:check check-config > "$work/noconfig.log" 2>&1 \
    && fail "the image ran without a configuration"
grep -q "/etc/outboxd/outboxd.toml not found" "$work/noconfig.log" || fail "no clear error without a configuration: $(cat "$work/noconfig.log")"
log "environment, layers and user clean; no configuration baked in"

# --- services --------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
db_port=$(free_port)
pg_hostport=$(sed -E 's#^[a-z]+://([^@/]*@)?([^/?]+).*#\2#' <<<"$database_url")
start_proxy() {
    setsid socat "TCP-LISTEN:$db_port,bind=127.0.0.1,fork,reuseaddr" "TCP:$pg_hostport" &
    proxy=$!
    pids+=("$proxy")
}
stop_proxy() { kill -- "-$proxy" 2>/dev/null || kill "$proxy" 2>/dev/null || true; }
start_proxy
proxied_url=$(sed -E "s#^([a-z]+://([^@/]*@)?)[^/?]+#\1127.0.0.1:$db_port#" <<<"$database_url")

cargo build --quiet --example mock_broker
target/debug/examples/mock_broker image.events:2 image.events.dlq:1 > "$work/broker" &
pids+=("$!")
for _ in $(seq 1 100); do [[ -s "$work/broker" ]] && break; sleep 0.1; done
bootstrap=$(head -n1 "$work/broker")
[[ -n "$bootstrap" ]] || fail "the mock broker did not start"


mkdir -p "$work/data"
chmod 777 "$work/data"
write_config() { # $1 file, $2 group
    cat > "$1" <<EOF
shutdown_timeout = "10s"
[kafka]
brokers = "$bootstrap"
[kafka.consumer_options]
"session.timeout.ms" = 6000
[[relay.tables]]
table = "$table"
topic = "image.events"
notify_channel = ""
poll_interval = "200ms"
[consumer]
group_id = "$2"
topics = ["image.events"]
[[consumer.routes]]
topic = "image.events"
handler = "record"
[handlers.record]
kind = "command"
program = "/bin/sh"
# Leaves an orphan behind each time: the subshell exits, its sleep is reparented to PID 1.
args = ["-c", "(sleep 0.2 &); echo \"\$OUTBOXD_EVENT_ID\" >> /data/ids"]
EOF
    chmod 644 "$1"
}
table="outbox_image_$$"
write_config "$work/outboxd.toml" "image-check-$$"
# The image's own `migrate` creates the reference table this check copies.
pm run --rm --network=host --read-only -v "$work/outboxd.toml:/etc/outboxd/outboxd.toml:ro" \
    -e "OUTBOXD_DATABASE__URL=$proxied_url" outboxd:check migrate >/dev/null 2>>"$work/podman.log" \
    || { cat "$work/podman.log" >&2; fail "outboxd migrate in the image"; }
psql "$database_url" -qAtc "CREATE TABLE $table (LIKE outbox INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)" \
    || fail "cannot create $table"

run_container() { # $1 name, $2 config, $3 http port, extra podman args...
    local name=$1 config=$2 port=$3
    shift 3
    containers+=("$name")
    pm run -d --name "$name" --network=host --read-only \
        -v "$config:/etc/outboxd/outboxd.toml:ro" -v "$work/data:/data" \
        -e "OUTBOXD_DATABASE__URL=$proxied_url" -e "OUTBOXD_HTTP__LISTEN=127.0.0.1:$port" \
        --health-interval disable "$@" outboxd:check >/dev/null 2>>"$work/podman.log" \
        || { cat "$work/podman.log" >&2; fail "podman run $name"; }
}
healthy() { pm healthcheck run "$1" >/dev/null 2>&1; }
wait_for() { # $1 what, $2 seconds, command...
    local what=$1 limit=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@"; do
        ((SECONDS < deadline)) || fail "timed out after ${limit} s waiting for: $what"
        sleep 0.5
    done
}
zombies() { pm exec "$1" sh -c 'cat /proc/[0-9]*/stat 2>/dev/null' | awk '$3 == "Z"' | wc -l; }

# --- the run ---------------------------------------------------------------------------
name="outboxd-check-$$"
run_container "$name" "$work/outboxd.toml" "$(free_port)"
wait_for "HEALTHCHECK to pass" 60 healthy "$name"
[[ "$(pm exec "$name" id -u)" == "10001" ]] || fail "the container does not run as uid 10001"
pm exec "$name" sh -c 'touch /probe' 2>/dev/null && fail "the root filesystem is writable"
log "healthy, running as uid 10001 on a read-only root"

total=200
psql "$database_url" -qAt -c "INSERT INTO $table (aggregate_type, aggregate_id, event_type, payload)
    SELECT 'image', 'k' || (g % 10), 'Checked', jsonb_build_object('n', g) FROM generate_series(1, $total) g
    RETURNING event_id" | sort > "$work/expected"
handled() { [[ -f "$work/data/ids" ]] && (($(sort -u "$work/data/ids" | wc -l) >= total)); }
wait_for "$total events relayed and handled" 120 handled
sort -u "$work/data/ids" | diff -q - "$work/expected" >/dev/null || fail "handled ids differ from the inserted ones"
log "relayed and handled $total events, every event id once or more"

sleep 1 # the last orphans' sleeps end
z=$(zombies "$name")
((z == 0)) || fail "$z zombie processes under tini after $total command calls"
log "no zombies after $total command calls, each leaving an orphan"

stop_proxy
wait_for "HEALTHCHECK to fail without the database" 60 bash -c "! podman --runtime runc healthcheck run $name >/dev/null 2>&1"
start_proxy
wait_for "HEALTHCHECK to pass again" 60 healthy "$name"
log "HEALTHCHECK fails while the database is unreachable and recovers"

stopped=$SECONDS
pm stop -t 30 "$name" >/dev/null 2>>"$work/podman.log"
took=$((SECONDS - stopped))
code=$(pm inspect --format '{{.State.ExitCode}}' "$name")
[[ "$code" == "0" ]] || { pm logs "$name" | tail -n 20 >&2; fail "exit code $code after SIGTERM"; }
((took <= 10)) || fail "the drain took ${took} s, past shutdown_timeout (10 s)"
log "podman stop: drained and exited 0 in ${took} s"

# Without tini, outboxd is PID 1 and nothing reaps the orphans: the check above can fail.
: > "$work/data/ids"
write_config "$work/bare.toml" "image-check-$$"
bare="outboxd-bare-$$"
run_container "$bare" "$work/bare.toml" "$(free_port)" --entrypoint '["/usr/local/bin/outboxd", "run"]'
wait_for "the bare container to pass HEALTHCHECK" 60 healthy "$bare"
psql "$database_url" -qAt -c "INSERT INTO $table (aggregate_type, aggregate_id, event_type, payload)
    SELECT 'image', 'k', 'Checked', '{}' FROM generate_series(1, 20)" >/dev/null
total=20
wait_for "20 more events handled" 60 handled
sleep 1
z=$(zombies "$bare")
((z > 0)) || fail "outboxd as PID 1 left no zombies: the zombie check proves nothing"
log "without tini, outboxd as PID 1 leaves $z zombies after 20 calls (what tini prevents)"
pm stop -t 30 "$bare" >/dev/null 2>>"$work/podman.log"

log "all checks passed"
