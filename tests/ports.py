"""Test helper, for the tests that start a server (the web page, `transformers serve`, a judge, torchrun): a TCP port
on 127.0.0.1 that nothing listens on now."""

import socket


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
