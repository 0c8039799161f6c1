"""A throw-away S3 server for tests and benchmarks: one-node Ceph radosgw on 127.0.0.1.

`S3Server(base).start()` creates a monitor, one memstore OSD and a radosgw in
`base` (Debian packages ceph-mon, ceph-osd, radosgw), each in its own session,
and `stop()` ends exactly those processes. `env()` gives the AWS_* variables a
client needs. Import `s3_fixture` into a test module for a session-wide server.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

ACCESS_KEY = "osbuildtestaccess"
SECRET_KEY = "osbuildtestsecret"
PROGRAMS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph-authtool", "monmaptool")

_POOLS = (".rgw.root", "default.rgw.control", "default.rgw.meta", "default.rgw.log",
          "default.rgw.buckets.index", "default.rgw.buckets.data", "default.rgw.buckets.non-ec")

# Runs with /usr/bin/python3 (python3-rados is a Debian package): registers the
# OSD, the radosgw key and the radosgw pools in one librados session.
_SETUP = r"""
import json, subprocess, sys, rados
conf, uuid, d, pools = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
r = rados.Rados(conffile=conf, name="client.admin")
r.conf_set("client_mount_timeout", "30")
r.connect(timeout=30)
def cmd(inbuf=b"", **kw):
    ret, out, err = r.mon_command(json.dumps(kw), inbuf)
    if ret != 0:
        sys.exit("mon command %s failed: %s %s" % (kw, ret, err))
    return out
secret = subprocess.check_output(["ceph-authtool", "--gen-print-key"]).strip().decode()
osd = cmd(json.dumps({"cephx_secret": secret}).encode(), prefix="osd new",
          uuid=uuid).strip().decode()
with open(d + "/osd.%s.keyring" % osd, "w") as f:
    f.write("[osd.%s]\n\tkey = %s\n" % (osd, secret))
with open(d + "/client.rgw.a.keyring", "wb") as f:
    f.write(cmd(prefix="auth get-or-create", entity="client.rgw.a",
                caps=["mon", "allow rw", "osd", "allow rwx"]))
for p in pools:
    cmd(prefix="osd pool create", pool=p, pg_num=8)
    cmd(prefix="osd pool application enable", pool=p, app="rgw")
r.shutdown()
"""


def available():
    """Whether the Ceph programs are installed."""
    return all(os.path.exists(f"/usr/bin/{p}") for p in PROGRAMS) and \
        subprocess.run(["/usr/bin/python3", "-c", "import rados"], capture_output=True,
                       check=False).returncode == 0


def free_port():
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(base, port, mon_ports, msgr_range):
    return f"""[global]
fsid = {{fsid}}
mon_host = [v2:127.0.0.1:{mon_ports[0]},v1:127.0.0.1:{mon_ports[1]}]
public_network = 127.0.0.0/8
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_port_min = {msgr_range[0]}
ms_bind_port_max = {msgr_range[1]}
keyring = {base}/$name.keyring
run_dir = {base}/run
admin_socket = {base}/run/$name.asok
log_file = {base}/log/$name.log
mon_cluster_log_file = {base}/log/cluster.log
crash_dir = {base}/crash
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
auth_allow_insecure_global_id_reclaim = false

[mon]
paxos_propose_interval = 0.05
paxos_min_wait = 0.01

[mon.a]
mon_data = {base}/mon/a

[osd]
osd_data = {base}/osd/$id
osd_objectstore = memstore
memstore_device_bytes = 8589934592
osd_memory_target = 1073741824

[client]
objecter_tick_interval = 0.5

[client.rgw.a]
rgw_frontends = beast endpoint=127.0.0.1:{port}
rgw_data = {base}/rgw
"""


class S3Server:
    """One-node Ceph with radosgw, all state in `base` (removed by `stop()`)."""

    def __init__(self, base, timeout=120):
        self.base = os.path.abspath(base)
        self.timeout = timeout
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.procs = {}
        self._conf = os.path.join(self.base, "ceph.conf")

    def env(self):
        """The environment variables a boto3 client needs for this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def _log(self, name):
        return open(os.path.join(self.base, "log", f"{name}.out"), "ab")  # pylint: disable=consider-using-with

    def _run(self, *argv):
        with self._log("setup") as log:
            subprocess.run(argv, check=True, stdout=log, stderr=log, cwd=self.base,
                           timeout=self.timeout)

    def _spawn(self, name, *argv):
        with self._log(name) as log:
            self.procs[name] = subprocess.Popen(  # pylint: disable=consider-using-with
                argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.base,
                start_new_session=True)

    def _check_alive(self, deadline):
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; logs in {self.base}/log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"S3 server did not start in {self.timeout} s; "
                               f"logs in {self.base}/log")

    def start(self):
        """Start mon, OSD and radosgw; returns once radosgw answers HTTP."""
        deadline = time.monotonic() + self.timeout
        for d in ("mon/a", "osd/0", "run", "log", "crash", "rgw"):
            os.makedirs(os.path.join(self.base, d), exist_ok=True)
        mon_ports = (free_port(), free_port())
        low = 20000 + (os.getpid() * 97) % 30000
        fsid = subprocess.check_output(["cat", "/proc/sys/kernel/random/uuid"], text=True).strip()
        with open(self._conf, "w", encoding="utf-8") as f:
            f.write(_config(self.base, self.port, mon_ports, (low, low + 99)).replace(
                "{fsid}", fsid))
        try:
            self._bootstrap(fsid, mon_ports, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _bootstrap(self, fsid, mon_ports, deadline):
        c = self._conf
        self._run("ceph-authtool", "--create-keyring", "mon.a.keyring", "--gen-key", "-n", "mon.",
                  "--cap", "mon", "allow *")
        self._run("ceph-authtool", "--create-keyring", "client.admin.keyring", "--gen-key",
                  "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                  "--cap", "mgr", "allow *")
        self._run("ceph-authtool", "mon.a.keyring", "--import-keyring", "client.admin.keyring")
        self._run("monmaptool", "--create", "--addv", "a",
                  f"[v2:127.0.0.1:{mon_ports[0]},v1:127.0.0.1:{mon_ports[1]}]",
                  "--fsid", fsid, "monmap")
        self._run("ceph-mon", "-c", c, "--mkfs", "-i", "a", "--monmap", "monmap",
                  "--keyring", "mon.a.keyring")
        self._spawn("mon.a", "ceph-mon", "-c", c, "-i", "a", "-f")
        osd_uuid = subprocess.check_output(["cat", "/proc/sys/kernel/random/uuid"],
                                           text=True).strip()
        self._run("/usr/bin/python3", "-c", _SETUP, c, osd_uuid, self.base, *_POOLS)
        self._run("ceph-osd", "-c", c, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        self._spawn("osd.0", "ceph-osd", "-c", c, "-i", "0", "-f")
        while True:
            with self._log("user-create") as log:
                rc = subprocess.run(["radosgw-admin", "-c", c, "user", "create", "--uid=tester",
                                     "--display-name=tester", f"--access-key={ACCESS_KEY}",
                                     f"--secret-key={SECRET_KEY}"], stdout=log, stderr=log,
                                    cwd=self.base, check=False, timeout=self.timeout).returncode
            if rc == 0:
                break
            self._check_alive(deadline)
            time.sleep(0.3)
        self.start_gateway(deadline)

    def start_gateway(self, deadline=None):
        """Start radosgw (again, after `stop_gateway()`); waits until it answers."""
        deadline = deadline or time.monotonic() + self.timeout
        self._stop("rgw.a")  # never two gateways, nor one we lose track of
        self._spawn("rgw.a", "radosgw", "-c", self._conf, "-n", "client.rgw.a", "-f")
        while True:
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=2):
                    return
            except urllib.error.HTTPError:
                return
            except OSError:
                self._check_alive(deadline)
                time.sleep(0.1)

    def _stop(self, name):
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop_gateway(self):
        """Stop radosgw only (the S3 endpoint goes away, the data stays)."""
        self._stop("rgw.a")

    def stop(self):
        """Stop what `start()` started: gateway, then OSD, then monitor."""
        for name in ("rgw.a", "osd.0", "mon.a"):
            self._stop(name)

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3  # pylint: disable=import-outside-toplevel
        env = self.env()
        return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            region_name="us-east-1")


@pytest.fixture(name="s3", scope="session")
def s3_fixture(tmp_path_factory):
    """A running S3 server for the whole test session (skips when Ceph is missing)."""
    if not available():
        pytest.skip("needs Debian packages ceph-mon ceph-osd radosgw (tools/install-deps)")
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


if __name__ == "__main__":
    srv = S3Server(sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/osbuild-s3")
    t0 = time.monotonic()
    srv.start()
    print(json.dumps(dict(srv.env(), startup_s=round(time.monotonic() - t0, 2))))
    srv.client().create_bucket(Bucket="probe")
    srv.stop()
