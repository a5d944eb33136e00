# shellcheck shell=bash disable=SC2034
GUEST_ARCH=arm64
GUEST_PORTS=(8080)
guest_prepare() { echo "hello-$GUEST_RELEASE" >"$GUEST_WORK/index.html"; GUEST_FILES+=("$GUEST_WORK/index.html:/www/"); }
guest_script() { cat <<'G'
httpd -p 8080 -h /www
guest_wait_listen 8080 30 || guest_fail "httpd not listening"
guest_ready
while :; do sleep 60; done
G
}
host_check() {
	local port; port=$(guest_host_port 8080)
	local want="hello-$GUEST_RELEASE${EXPECT_SUFFIX:-}"
	python3 - "$port" "$want" <<'PY'
import sys, time, urllib.request
for _ in range(30):
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/index.html", timeout=5).read().decode().strip()
        print("host: got", body)
        sys.exit(0 if body == sys.argv[2] else 1)
    except Exception as e:
        print("host: retry:", e); time.sleep(1)
sys.exit(1)
PY
}
