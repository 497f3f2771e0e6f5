"""ZeroMQ CURVE: encrypted links, and only keys on the allow-list get in.

`hetpipe keys init --dir DIR` writes, with pyzmq's own certificate tools:

    DIR/stage.key, stage.key_secret              the daemons' keypair (servers, and clients of the next stage)
    DIR/coordinator.key, coordinator.key_secret  the coordinators' keypair
    DIR/allowed/stage.key, coordinator.key       the public keys a daemon lets in

Copy DIR to every machine (or only what each needs: a coordinator needs its own pair and
stage.key). A daemon started with `--auth DIR` runs a ZAP authenticator over DIR/allowed; a
client without an allowed key never completes its handshake and gets nothing.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from engine.core.errors import UserError

ROLES = ("stage", "coordinator")


def init_keys(directory: str | Path, force: bool = False) -> Path:
    d = Path(directory)
    if (d / "stage.key_secret").exists() and not force:
        raise UserError(f"{d} already holds keys; replacing them needs force")
    allowed = d / "allowed"
    allowed.mkdir(parents=True, exist_ok=True)
    for role in ROLES:
        public, secret = zmq.auth.create_certificates(d, role)
        os.chmod(secret, 0o600)
        shutil.copy(public, allowed / f"{role}.key")
    return d


@dataclass
class Auth:
    directory: Path
    role: str
    public: bytes
    secret: bytes
    server_public: bytes  # the daemons' public key, which clients must know

    @classmethod
    def load(cls, directory: str | Path | None, role: str) -> Auth | None:
        if directory is None:
            return None
        d = Path(directory)
        try:
            public, secret = zmq.auth.load_certificate(d / f"{role}.key_secret")
            server_public, _ = zmq.auth.load_certificate(d / "stage.key")
        except (OSError, ValueError) as e:
            raise UserError(f"keys in {d}: cannot read the {role} keys ({e}); make them with `hetpipe keys init`") \
                from None
        if role == "stage" and not (d / "allowed").is_dir():
            raise UserError(f"keys in {d}: no allowed/ directory of public keys")
        return cls(d, role, public, secret, server_public)

    def serve(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def connect(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public

    def start_authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """The ZAP handler every CURVE server socket of this context consults."""
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(self.directory / "allowed"))
        return auth


def is_loopback(address: str) -> bool:
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
