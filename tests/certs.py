"""Test certificates made with the `openssl` command: a CA, a server certificate for
127.0.0.1 and a client certificate, all signed by the CA (tests only; 1 day)."""

import shutil
import subprocess
from pathlib import Path

import pytest


def _openssl(*args, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def make_certs(d: Path) -> dict:
    """{ca, server_cert, server_key, client_cert, client_key, other_cert, other_key}:
    paths under d.  `other_*` is a client certificate from a CA the server does not trust."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    d.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "other_ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
                 "-out", f"{ca}.crt", "-days", "1", "-subj", f"/CN=localnet test {ca}", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, ca, ext in (("server", "ca", "server.ext"), ("client", "ca", "client.ext"),
                          ("other", "other_ca", "client.ext")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", f"/CN=localnet test {name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", ext, cwd=d)
    out = {"ca": d / "ca.crt"}
    for name in ("server", "client", "other"):
        out[f"{name}_cert"], out[f"{name}_key"] = d / f"{name}.crt", d / f"{name}.key"
    return {k: str(v) for k, v in out.items()}
