# shellcheck shell=bash disable=SC2034
GUEST_ARCH=arm64
GUEST_TIMEOUT=15
guest_script() { echo "${MODE:-guest_ready; while :; do sleep 60; done}"; }
host_check() { sleep 1000; }
