# shellcheck shell=bash disable=SC2034
GUEST_ARCH=arm64
guest_script() { echo 'echo about to fail; exit 7'; }
