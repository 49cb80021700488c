# shellcheck shell=bash
# Garage, the second S3-compatible server the test command runs against (sourced by lib.sh).
#
#   ensure_garage      build Garage $GARAGE_VERSION once with `cargo install` into
#                      ~/.cache/uplink/garage-$GARAGE_VERSION (7.5 minutes on 2 cores here,
#                      nothing once cached); sets GARAGE to its binary
#   garage_up DIR      start a one-node Garage under DIR/garage with a key and the bucket
#                      $UPLINK_S3_BUCKET, write DIR/garage-env (UPLINK_GARAGE_S3_*)
#   garage_down DIR    stop it (stack_down calls it)
#
# Ports: UPLINK_GARAGE_S3_PORT (3900), UPLINK_GARAGE_RPC_PORT (3901).

GARAGE_VERSION="2.5.0"

ensure_garage() {
    local root="$HOME/.cache/uplink/garage-$GARAGE_VERSION"
    GARAGE="$root/bin/garage"
    export GARAGE
    if [[ -x "$GARAGE" ]] && "$GARAGE" --version 2>/dev/null | grep -q "$GARAGE_VERSION"; then
        return 0
    fi
    command -v cargo >/dev/null 2>&1 || die "missing: cargo (Rust toolchain), needed to build Garage $GARAGE_VERSION"
    log "building Garage $GARAGE_VERSION with cargo install into $root (several minutes, once)"
    local build="$HOME/.cache/uplink/garage-build"
    CARGO_TARGET_DIR="$build" cargo install garage --locked --version "$GARAGE_VERSION" \
        --root "$root" --quiet || die "cargo install garage --version $GARAGE_VERSION failed"
    rm -rf "$build"
    "$GARAGE" --version 2>/dev/null | grep -q "$GARAGE_VERSION" ||
        die "$GARAGE does not run after cargo install garage --version $GARAGE_VERSION"
}

# _garage ARGS...: the Garage CLI against DIR's node (GARAGE_CONF set by garage_up).
_garage() { "$GARAGE" -c "$GARAGE_CONF" "$@"; }

garage_up() {
    local dir="$1" s3 rpc
    pick_port UPLINK_GARAGE_S3_PORT 3900
    s3="$REPLY"
    pick_port UPLINK_GARAGE_RPC_PORT 3901
    rpc="$REPLY"
    mkdir -p "$dir/garage/meta" "$dir/garage/data" "$dir/logs"
    GARAGE_CONF="$dir/garage/garage.toml"
    export GARAGE_CONF
    cat >"$GARAGE_CONF" <<EOF
metadata_dir = "$dir/garage/meta"
data_dir = "$dir/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"

[s3_api]
s3_region = "$UPLINK_S3_REGION"
api_bind_addr = "127.0.0.1:$s3"
EOF
    log "Garage $GARAGE_VERSION: starting S3 on 127.0.0.1:$s3 (rpc $rpc)"
    "$GARAGE" -c "$GARAGE_CONF" server >"$dir/logs/garage.log" 2>&1 &
    local pid=$!
    printf '%s\n' "$pid" >"$dir/garage.pid"

    local node="" deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)); do
        kill -0 "$pid" 2>/dev/null || {
            tail -n 40 "$dir/logs/garage.log" >&2 || true
            die "Garage exited during start-up (log: $dir/logs/garage.log)"
        }
        node="$(_garage node id -q 2>/dev/null | cut -d@ -f1 || true)"
        [[ -n "$node" ]] && break
        sleep 0.5
    done
    [[ -n "$node" ]] || die "Garage did not answer 'node id' within 60 s (log: $dir/logs/garage.log)"
    _garage layout assign -z dc1 -c 1G "$node" >/dev/null || die "garage layout assign failed"
    _garage layout apply --version 1 >/dev/null || die "garage layout apply failed"
    local created key secret
    created="$(_garage key create uplink-test)" || die "garage key create failed"
    key="$(awk '/Key ID/ {print $NF; exit}' <<<"$created")"
    secret="$(awk '/Secret key/ {print $NF; exit}' <<<"$created")"
    [[ -n "$key" && -n "$secret" ]] || die "could not read the key Garage created: $created"
    _garage bucket create "$UPLINK_S3_BUCKET" >/dev/null || die "garage bucket create failed"
    _garage bucket allow --read --write --owner "$UPLINK_S3_BUCKET" --key uplink-test >/dev/null ||
        die "garage bucket allow failed"

    local endpoint="http://127.0.0.1:$s3" code="000"
    deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)); do
        code="$(s3_status "$endpoint/$UPLINK_S3_BUCKET/" "$key" "$secret")"
        [[ "$code" == 200 ]] && break
        sleep 0.5
    done
    [[ "$code" == 200 ]] ||
        die "Garage did not list bucket $UPLINK_S3_BUCKET with its key within 60 s (last HTTP status $code; log: $dir/logs/garage.log)"
    local bad
    bad="$(s3_status "$endpoint/$UPLINK_S3_BUCKET/" "$key" "wrong$secret")"
    [[ "$bad" == 403 ]] || die "Garage at $endpoint accepted a bad signature (HTTP $bad)"
    UPLINK_STACK_TMP_CORS="$dir/logs/garage-cors.xml" s3_cors "$endpoint" "$UPLINK_S3_BUCKET" "$key" "$secret"
    cat >"$dir/garage-env" <<EOF
# Written by scripts/garage.sh garage_up.
export UPLINK_GARAGE_S3_ENDPOINT='$endpoint'
export UPLINK_GARAGE_S3_ACCESS_KEY='$key'
export UPLINK_GARAGE_S3_SECRET_KEY='$secret'
EOF
    log "Garage: S3 ready at $endpoint (right key: 200, bad signature: 403)"
}

garage_down() {
    local dir="$1" pid
    [[ -f "$dir/garage.pid" ]] || return 0
    pid="$(cat "$dir/garage.pid")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/garage.pid"
}
