#!/usr/bin/env python3
"""A Warbler device client written from docs/protocol.md alone (no Rust involved).

    python3 warbler_client.py listen --addr 127.0.0.1:7400 --token TOKEN --device phone [--count N]
    python3 warbler_client.py publish --addr 127.0.0.1:7400 --token TOKEN --to alice --id m1 --body hi

`listen` prints one line per message, `seq=<seq> id=<id> body=<body>`, acks each, and drops
any seq it has already seen (delivery is at least once). Needs `pip install msgpack`.
"""
import argparse
import socket
import struct
import sys

import msgpack


def send_frame(sock, frame):
    payload = msgpack.packb(frame, use_bin_type=True)
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return buf


def recv_frame(sock):
    (length,) = struct.unpack(">I", recv_exact(sock, 4))
    frame = msgpack.unpackb(recv_exact(sock, length), raw=False)
    if frame.get("t") == "ping":
        send_frame(sock, {"t": "pong", "n": frame["n"]})
        return recv_frame(sock)
    return frame


def connect(addr, token, device):
    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    send_frame(sock, {"t": "hello", "token": token, "device": device, "v": 1})
    welcome = recv_frame(sock)
    if welcome["t"] != "welcome":
        raise SystemExit(f"refused: {welcome.get('code')}: {welcome.get('message')}")
    return sock, welcome


def close_gracefully(sock):
    """Half-close, then read until the server closes: every ack sent is then processed.
    Closing with unread data makes TCP reset the connection, and acks in flight are lost."""
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):
        pass
    sock.close()


def listen(args):
    sock, welcome = connect(args.addr, args.token, args.device)
    print(f"welcome user={welcome['user']} acked={welcome['acked']}", flush=True)
    last = welcome["acked"]
    received = 0
    while args.count is None or received < args.count:
        frame = recv_frame(sock)
        if frame["t"] == "error":
            raise SystemExit(f"error: {frame['code']}: {frame['message']}")
        if frame["t"] != "msg":
            continue
        if frame["seq"] <= last:
            continue  # a redelivery: already processed
        if frame["seq"] != last + 1:
            print(f"gap: expected {last + 1}, got {frame['seq']}", flush=True)
        last = frame["seq"]
        body = frame["body"].decode("utf-8", "replace")
        print(f"seq={frame['seq']} id={frame['id']} body={body}", flush=True)
        send_frame(sock, {"t": "ack", "seq": frame["seq"]})
        received += 1
    close_gracefully(sock)


def publish(args):
    sock, _ = connect(args.addr, args.token, args.device)
    send_frame(sock, {"t": "publish", "id": args.id, "to": args.to, "body": args.body.encode()})
    while True:
        frame = recv_frame(sock)
        if frame["t"] == "published" and frame["id"] == args.id:
            print(f"published seq={frame['seq']}", flush=True)
            return
        if frame["t"] == "error":
            raise SystemExit(f"error: {frame['code']}: {frame['message']}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("listen", "publish"):
        s = sub.add_parser(name)
        s.add_argument("--addr", default="127.0.0.1:7400")
        s.add_argument("--token", required=True)
        s.add_argument("--device", default="python")
    sub.choices["listen"].add_argument("--count", type=int)
    for flag in ("--to", "--id", "--body"):
        sub.choices["publish"].add_argument(flag, required=True)
    args = p.parse_args()
    {"listen": listen, "publish": publish}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
