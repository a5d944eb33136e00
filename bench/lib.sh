# Helpers shared by the benchmark scripts (sourced).
# shellcheck shell=bash

# free_ports N: N distinct free TCP ports on 127.0.0.1, space-separated.
free_ports() {
	python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# proc_ticks PID: utime + stime of every thread of PID, in clock ticks (fields 14 and 15 of /proc/<pid>/stat;
# the command name in field 2 is skipped by cutting at its closing parenthesis).
proc_ticks() {
	local stat
	stat=$(<"/proc/$1/stat")
	stat=${stat##*) }
	# shellcheck disable=SC2086 # split the fields
	set -- $stat
	echo $((${12} + ${13}))
}
