#!/bin/sh
# The README demo: start a daemon that never binds through fdlaunch-listen,
# ask it something over the socket it was handed, stop it.
#   sh examples/demo.sh                 (or: make demo)
#   PORT=8081 sh examples/demo.sh       another port than 8080
# A port already in use ends it at once with fdlaunch-listen's bind error.
set -eu
here=$(dirname "$0")
port=${PORT:-8080}
python=${PYTHON:-python3}

fdlaunch-listen -v -tcp:label=http:127.0.0.1:"$port" -- "$python" "$here/hello_httpd.py" &
daemon=$!
trap 'kill "$daemon" 2>/dev/null || :' EXIT INT TERM

"$python" - "$port" "$daemon" <<'PY'
import sys, time, urllib.request
port, pid = sys.argv[1], sys.argv[2]


def gone(pid):
    """The daemon exited (fdlaunch-listen could not bind, say): it is a zombie or no more."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


for _ in range(100):
    if gone(pid):
        sys.exit(f"demo: fdlaunch-listen (pid {pid}) exited before answering; its message is above")
    try:
        reply = urllib.request.urlopen(f"http://127.0.0.1:{port}/demo", timeout=1).read().decode()
    except OSError:
        time.sleep(0.05)
        continue
    if reply.startswith(f"hello from pid {pid} "):
        break
    time.sleep(0.05)  # someone else answers on this port while ours has not bound yet
else:
    sys.exit("demo: the daemon did not answer")
print(reply, end="")
print(f"(fdlaunch-listen started as pid {pid}: the daemon kept it)")
PY
