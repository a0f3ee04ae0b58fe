#!/usr/bin/env bash
# The system packages local runs need beside the venv: Debian's redis-server (the Kafka-
# protocol broker and tritonserver come from the venv's wheels). Run as root or with sudo;
# CI runs it on every fresh machine. The servers themselves are started and stopped by the
# code that needs them (serving/local_services.py), never left running.
#   bash scripts/services.sh install
set -euo pipefail
case "${1:-install}" in
  install)
    if command -v redis-server >/dev/null; then
      echo "[services] redis-server present: $(redis-server --version | cut -d' ' -f3)"
      exit 0
    fi
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "[services] installing redis-server (apt)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
    echo "[services] redis-server $(redis-server --version | cut -d' ' -f3) installed"
    ;;
  *)
    echo "usage: $0 install" >&2
    exit 2
    ;;
esac
