"""What the Python benchmarks share (bench-kilnd.py, bench-scale.py, bench-upstream.py):
errors, files, the work directory and the processes started in it, the load average, and
manifest requests to a registry over one kept-alive connection."""

import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile

INDEX = "application/vnd.oci.image.index.v1+json"
ACCEPT = ", ".join([
    INDEX,
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def write(path, data):
    """Writes text or bytes, making the parent directories."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


@contextlib.contextmanager
def scratch(prefix, keep=False):
    """A work directory and a list for the processes started in it: on the way out each
    one still running gets SIGTERM (SIGKILL after 30 s), and the directory is removed
    unless `keep`."""
    work = tempfile.mkdtemp(prefix=prefix)
    procs = []
    try:
        yield work, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def load():
    return " ".join(open("/proc/loadavg").read().split()[:3])


class Registry:
    """HEAD and GET of manifests over one kept-alive HTTP connection."""

    def __init__(self, addr):
        self.addr = addr
        self.conn = None

    def request(self, method, repo, ref):
        """(status, Docker-Content-Digest, Content-Type, body); status 0 if unreachable."""
        for _ in range(2):
            try:
                if self.conn is None:
                    host, port = self.addr.rsplit(":", 1)
                    self.conn = http.client.HTTPConnection(host, int(port), timeout=300)
                self.conn.request(method, f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT})
                r = self.conn.getresponse()
                body = r.read()
                return r.status, r.getheader("Docker-Content-Digest"), r.getheader("Content-Type"), body
            except (OSError, http.client.HTTPException):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
        return 0, None, None, b""

    def head(self, repo, ref):
        """(status, digest, content type)."""
        return self.request("HEAD", repo, ref)[:3]

    def get_json(self, repo, ref):
        """(status, the parsed document) or (status, the body) when not 200."""
        status, _, _, body = self.request("GET", repo, ref)
        return status, json.loads(body) if status == 200 else body

    def arches(self, repo, ref):
        """The sorted architectures of the index at `ref`; [] if it is not there."""
        status, doc = self.get_json(repo, ref)
        if status != 200:
            return []
        return sorted(m.get("platform", {}).get("architecture", "?") for m in doc.get("manifests", []))
