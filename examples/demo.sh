#!/bin/sh
# The README demo: start a daemon that never binds through fdlaunch-listen,
# ask it something over the socket it was handed, stop it.
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
for _ in range(100):
    try:
        reply = urllib.request.urlopen(f"http://127.0.0.1:{port}/demo", timeout=5).read().decode()
        break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("demo: the daemon did not answer")
print(reply, end="")
print(f"(fdlaunch-listen started as pid {pid}: the daemon kept it)")
PY
