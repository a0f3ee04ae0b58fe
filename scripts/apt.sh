# Sourced by install.sh and services.sh: install Debian packages with apt (root or sudo).
#   apt_install TAG PACKAGE...
apt_install() {
  local tag=$1
  shift
  [ "$#" -gt 0 ] || return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "[$tag] installing $* (apt)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}
