#!/usr/bin/env bash
# The system packages local runs need beside the venv: Debian's redis-server, and chromium
# with chromium-driver for the merchandising console's browser test (the Kafka-protocol
# broker and tritonserver come from the venv's wheels). Run as root or with sudo;
# CI runs it on every fresh machine. The servers themselves are started and stopped by the
# code that needs them (devstack/local_services.py), never left running.
#   bash scripts/services.sh install
set -euo pipefail
case "${1:-install}" in
  install)
    # Each package is installed only when its binary is missing.
    missing=()
    command -v redis-server >/dev/null || missing+=(redis-server)
    # chromium-driver matches chromium's version; the test drives it at /usr/bin/chromedriver
    command -v chromium >/dev/null || missing+=(chromium)
    [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
    # nginx: the optional load balancer in front of several API processes (run unprivileged
    # on loopback by devstack/local_services.py, never as the system service)
    [ -x /usr/sbin/nginx ] || missing+=(nginx)
    . "$(dirname "$0")/apt.sh"
    apt_install services "${missing[@]}"
    echo "[services] redis-server $(redis-server --version | cut -d' ' -f3)"
    echo "[services] $(/usr/bin/chromedriver --version | cut -d' ' -f1-2)"
    echo "[services] $(/usr/sbin/nginx -v 2>&1)"
    ;;
  *)
    echo "usage: $0 install" >&2
    exit 2
    ;;
esac
