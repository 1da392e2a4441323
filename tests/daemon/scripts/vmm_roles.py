# A VMM as an independent client would write it (no vfio-intx code): run by
# tests/daemon/socket.rs as an unprivileged uid in the socket group.
# Usage: vmm_roles.py SOCKET OWN_BDF OTHER_BDF; prints one JSON object.
import json
import os
import socket
import struct
import sys

path, own, other = sys.argv[1:4]


def connect():
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    return s


def send(s, request, fds=()):
    body = json.dumps(request).encode()
    frame = struct.pack(">I", len(body)) + body
    if fds:
        socket.send_fds(s, [frame], list(fds))
    else:
        s.sendall(frame)


def recv(s):
    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk:
                raise EOFError("the daemon closed the connection")
            data += chunk
        return data

    (n,) = struct.unpack(">I", exactly(4))
    return json.loads(exactly(n))


def ask(request):
    s = connect()
    send(s, request)
    r = recv(s)
    s.close()
    return r


out = {
    "status": ask({"op": "status"}),
    "mask-before-session": ask({"op": "mask", "bdf": own}),
}
irqfd = os.eventfd(0, os.EFD_NONBLOCK)
resample = os.eventfd(0, os.EFD_NONBLOCK)
session = connect()
send(session, {"op": "session", "bdf": own}, [irqfd, resample])
out["session"] = recv(session)
out["mask-own"] = ask({"op": "mask", "bdf": own})
out["unmask-own"] = ask({"op": "unmask", "bdf": own})
out["reset-own"] = ask({"op": "reset", "bdf": own})
out["mask-other"] = ask({"op": "mask", "bdf": other})
out["reset-other"] = ask({"op": "reset", "bdf": other})
out["sim-raise-other"] = ask({"op": "sim-raise", "bdf": other, "count": 1})
session.close()
print(json.dumps(out))
