"""A throwaway PKI for TLS tests: a CA, a server certificate for 127.0.0.1, a client certificate."""

import subprocess


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d, ca_name="osbuild test CA", client_cn="entitled-client"):
    """Write ca.*, server.* and client.* (EC keys, valid two days) into the pathlib dir `d`."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", f"/CN={ca_name}", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for who, cn in (("server", "127.0.0.1"), ("client", client_cn)):
        _openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr",
                 "-subj", f"/CN={cn}", cwd=d)
        extra = ["-extfile", "san.ext"] if who == "server" else []
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{who}.crt", "-days", "2", *extra, cwd=d)
    return d
