#!/usr/bin/env python3
"""A Warbler device client written from docs/protocol.md alone (no Rust involved).

    python3 warbler_client.py listen --addr 127.0.0.1:7400 --token TOKEN --device phone [--count N]
    python3 warbler_client.py publish --addr 127.0.0.1:7400 --token TOKEN --to alice --id m1 --body hi

`listen` prints one line per message, `seq=<seq> id=<id> body=<body>`, acks each, and drops
any seq it has already seen (delivery is at least once). Over TCP (the default) frames are
MessagePack and it needs `pip install msgpack`. With `--ws` it speaks JSON frames over a
WebSocket to the HTTP address (`--addr 127.0.0.1:7480`) and needs nothing but the standard
library (the WebSocket handshake and framing of RFC 6455 are below).
"""
import argparse
import base64
import hashlib
import json
import os
import socket
import struct
import sys


class Tcp:
    """Frames as a 4-byte big-endian length and a MessagePack map."""

    def __init__(self, addr):
        import msgpack

        self.msgpack = msgpack
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))

    def send(self, frame):
        if "body" in frame:
            frame = dict(frame, body=frame["body"].encode())
        payload = self.msgpack.packb(frame, use_bin_type=True)
        self.sock.sendall(struct.pack(">I", len(payload)) + payload)

    def recv(self):
        (length,) = struct.unpack(">I", recv_exact(self.sock, 4))
        frame = self.msgpack.unpackb(recv_exact(self.sock, length), raw=False)
        if frame.get("t") == "msg":
            frame["body"] = bytes(frame["body"])
        return frame

    def close(self):
        """Half-close, then read until the server closes: every ack sent is then processed.
        Closing with unread data makes TCP reset the connection, and acks in flight are lost."""
        self.sock.shutdown(socket.SHUT_WR)
        while self.sock.recv(65536):
            pass
        self.sock.close()


WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocketJson:
    """Frames as JSON objects in WebSocket text messages (`GET /v1/ws`)."""

    def __init__(self, addr):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += recv_exact(self.sock, 1)
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0]:
            raise SystemExit(f"WebSocket upgrade refused: {lines[0]}")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
        if headers.get("sec-websocket-accept") != accept:
            raise SystemExit("WebSocket upgrade answered with a wrong Sec-WebSocket-Accept")

    def _send(self, opcode, payload):
        # A client masks every frame it sends.
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def _recv_message(self):
        """One whole message (fragments joined): (opcode, payload)."""
        opcode, payload = None, b""
        while True:
            b0, b1 = recv_exact(self.sock, 2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", recv_exact(self.sock, 2))
            elif n == 127:
                (n,) = struct.unpack(">Q", recv_exact(self.sock, 8))
            data = recv_exact(self.sock, n)  # the server does not mask
            op = b0 & 0x0F
            if op == 0x9:  # ping: answer pong with the same data
                self._send(0xA, data)
                continue
            if op == 0x8:
                raise ConnectionError("server closed the WebSocket")
            if op != 0x0:
                opcode = op
            payload += data
            if b0 & 0x80:
                return opcode, payload

    def send(self, frame):
        self._send(0x1, json.dumps(frame).encode())

    def recv(self):
        opcode, payload = self._recv_message()
        if opcode != 0x1:
            raise SystemExit("a JSON client got a binary message")
        frame = json.loads(payload)
        if frame.get("t") == "msg":
            if "body_b64" in frame:
                frame["body"] = base64.b64decode(frame.pop("body_b64"))
            else:
                frame["body"] = frame["body"].encode()
        return frame

    def close(self):
        """Close handshake: the server processes what was sent before, then closes too."""
        self._send(0x8, struct.pack(">H", 1000))
        try:
            while True:
                self._recv_message()
        except ConnectionError:
            pass
        self.sock.close()


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return buf


def recv_frame(conn):
    frame = conn.recv()
    if frame.get("t") == "ping":
        conn.send({"t": "pong", "n": frame["n"]})
        return recv_frame(conn)
    return frame


def connect(args):
    conn = WebSocketJson(args.addr) if args.ws else Tcp(args.addr)
    conn.send({"t": "hello", "token": args.token, "device": args.device, "v": 1})
    welcome = recv_frame(conn)
    if welcome["t"] != "welcome":
        raise SystemExit(f"refused: {welcome.get('code')}: {welcome.get('message')}")
    return conn, welcome


def listen(args):
    conn, welcome = connect(args)
    print(f"welcome user={welcome['user']} acked={welcome['acked']}", flush=True)
    last = welcome["acked"]
    received = 0
    while args.count is None or received < args.count:
        frame = recv_frame(conn)
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
        conn.send({"t": "ack", "seq": frame["seq"]})
        received += 1
    conn.close()


def publish(args):
    conn, _ = connect(args)
    conn.send({"t": "publish", "id": args.id, "to": args.to, "body": args.body})
    while True:
        frame = recv_frame(conn)
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
        s.add_argument("--ws", action="store_true", help="JSON over a WebSocket to the HTTP address")
    sub.choices["listen"].add_argument("--count", type=int)
    for flag in ("--to", "--id", "--body"):
        sub.choices["publish"].add_argument(flag, required=True)
    args = p.parse_args()
    {"listen": listen, "publish": publish}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
