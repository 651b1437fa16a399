#!/usr/bin/env bash
# A real OpenAI-compatible chat-completions server on loopback, for the endpoint client's tests:
# Hugging Face's `transformers serve` (PyPI `transformers[serving]`, torch on CPU) serving one local
# checkpoint, from the venv scripts/serve-venv.sh installs outside the clone.
#   openai-server.sh start <port> <checkpoint dir> <pid file>   # returns once /health answers
#   openai-server.sh stop <pid file>
set -euo pipefail
case ${1:-} in
  start)
    port=$2 model=$3 pidfile=$4
    venv=$(bash "$(dirname "$0")/serve-venv.sh")
    log=${pidfile%.pid}.log
    "$venv/bin/transformers" serve "$model" --host 127.0.0.1 --port "$port" --device cpu >"$log" 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 240); do
      if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; then
        exit 0
      fi
      kill -0 "$(cat "$pidfile")" 2>/dev/null || { echo "transformers serve died:" >&2; tail -20 "$log" >&2; exit 1; }
      sleep 0.5
    done
    echo "transformers serve did not answer on port $port within 120 s" >&2; tail -20 "$log" >&2; exit 1
    ;;
  stop)
    pidfile=$2
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    ;;
  *) echo "usage: $0 start <port> <checkpoint> <pidfile> | stop <pidfile>" >&2; exit 2 ;;
esac
