#!/usr/bin/env python3
"""The engine of scripts/bench-upstream: kilnd with an upstream registry (a team cache),
in one run, against its reference.

1. Fetch all vs build all. A temp workspace of N small packages (two arches each:
   `FROM kiln/busybox:latest` imported by kiln.toml, `RUN` writing a file, so each target
   is a real build; the builder is kilnd's default). kilnd A, with an empty cache and
   `--upstream U --push`, builds all N x 2 targets and pushes them to U (Debian's
   docker-registry on 127.0.0.1): timed from its start to every target Ok ("build all").
   kilnd B, with another empty cache and `--upstream U`, on the same workspace: timed from
   its start to every target Ok, each one fetched ("fetch all"). Target: build / fetch
   >= 20.
2. A 256 MiB image (one layer of random bytes) in U: kilnd fetches it into its cache
   (the registry's pull-through: a GET of the manifest on kilnd's registry, which kilnd
   fetches through from U with only the missing blobs, all verified), against
   `skopeo copy docker://U/... oci:LAYOUT` (the reference). Target: kilnd no slower.

Fetch before build is lazy (a target lands with its package's index only; its per-arch
manifest, config and layers are fetched from the upstream on first read), so after
"fetch all" it also times what that defers: `skopeo copy` of one target from kilnd B into
an OCI layout (the first copy reads the target's manifest and blobs from the upstream
through B, a second one nothing), with the requests each made to the upstream.

Times are time.monotonic(). Readiness ("every target Ok") is followed on kilnd's event
stream (`GET /api/v1/events` on its socket: a snapshot, then events), not polled, so it
is seen when it happens and costs no process per poll on these shared cores; one `kiln
status --json` then confirms it. For the fetch it also prints what bounds it: the
requests kilnd B made (from the upstream's access log: `GET /v2/` probes, manifests,
blobs) and the CPU time kilnd B and the upstream spent, which share this machine's cores.
"""

import argparse
import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import time

from benchlib import INDEX, die, load, scratch, write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def wait(what, pred, seconds, step=0.05):
    end = time.monotonic() + seconds
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            die(f"timed out after {seconds}s waiting for {what}")
        time.sleep(step)


def cpu_s(pid):
    """User + system CPU seconds of a running process."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Upstream:
    """Debian's docker-registry on 127.0.0.1, a free port."""

    def __init__(self, work):
        d = os.path.join(work, "upstream")
        os.makedirs(d)
        cfg = os.path.join(d, "config.yml")
        write(cfg, "version: 0.1\nlog:\n  level: info\n  formatter: text\n"
                   f"storage:\n  filesystem:\n    rootdirectory: {d}/data\n"
                   "http:\n  addr: 127.0.0.1:0\n  secret: kiln-bench\n")
        self.log = os.path.join(d, "registry.log")
        self.proc = subprocess.Popen(["/usr/bin/docker-registry", "serve", cfg],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT)

        def addr():
            for line in open(self.log):
                if "listening on " in line:
                    a = line.split("listening on ", 1)[1].split()[0].strip('"')
                    if not a.endswith(":0"):
                        return a
            return None

        self.addr = wait("docker-registry to listen", addr, 30)

    def requests(self):
        """The URI of every request answered so far."""
        out = []
        for line in open(self.log):
            if 'msg="response completed"' in line and "http.request.uri=" in line:
                uri = line.split("http.request.uri=", 1)[1].lstrip('"')
                out.append(uri.split('"', 1)[0].split(" ", 1)[0])
        return out


class Kilnd:
    def __init__(self, args, work, name, ws, extra):
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir)
        self.socket = os.path.join(self.dir, "kilnd.sock")
        ready = os.path.join(self.dir, "ready.json")
        self.logf = os.path.join(self.dir, "kilnd.log")
        self.kiln = args.kiln
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [args.kilnd, "--cache", os.path.join(self.dir, "cache"), "--listen", "127.0.0.1:0",
             "--socket", self.socket, "--ready-file", ready, *extra, ws],
            stdout=open(self.logf, "w"), stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1"})

        def ready_addr():
            if self.proc.poll() is not None:
                die(f"kilnd exited: {open(self.logf).read()[-3000:]}")
            try:
                return json.load(open(ready))["registry"][0]
            except (OSError, ValueError, KeyError, IndexError):
                return None

        self.addr = wait("kilnd's ready file", ready_addr, 60)
        self.ready_s = time.monotonic() - self.t0

    def status(self):
        out = subprocess.run([self.kiln, "--socket", self.socket, "status", "--json"],
                             capture_output=True, text=True)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def wait_all_ok_on_events(k, n, seconds):
    """Follows kilnd's event stream until every target of the n packages is Ok at its
    package's tag (folded from the snapshot and the `target_planned`, `finished` and
    `served_from_cache` events); returns the time.monotonic() it saw that, confirmed by
    `kiln status --json`."""
    end = time.monotonic() + seconds
    conn = UnixConnection(k.socket, seconds)
    conn.request("GET", "/api/v1/events")
    r = conn.getresponse()
    if r.status != 200:
        die(f"kilnd's event stream: {r.status} {r.read()[:300]!r}")
    planned, ok = {}, {}
    try:
        while time.monotonic() < end:
            line = r.readline()
            if not line:
                die("kilnd closed its event stream")
            item = json.loads(line)
            if item["kind"] == "snapshot":
                planned, ok = {}, {}
                for name, p in item["snapshot"]["packages"].items():
                    for arch, t in p["targets"].items():
                        planned[(name, arch)] = p.get("tag")
                        if t.get("status") == "ok":
                            ok[(name, arch)] = t.get("tag")
            else:
                ev = item["event"]
                kind, key = ev["type"], (ev.get("package"), ev.get("arch"))
                if kind == "target_planned":
                    planned[key] = ev["tag"]
                elif kind == "finished" and ev["summary"]["outcome"] == "ok":
                    ok[key] = ev["summary"]["tag"]
                elif kind == "served_from_cache":
                    ok[key] = ev["tag"]
                else:
                    continue
            if len(planned) == 2 * n and all(ok.get(k) == t for k, t in planned.items()):
                seen = time.monotonic()
                state = all_ok(k.status(), n)
                if state:
                    return seen, state
    finally:
        conn.close()
    die(f"timed out after {seconds}s waiting for every target to be Ok")


def all_ok(state, n):
    if not state:
        return None
    pkgs = state.get("packages", {})
    if len(pkgs) != n:
        return None
    for p in pkgs.values():
        for t in p["targets"].values():
            if t.get("status") != "ok" or t.get("tag") != p.get("tag"):
                return None
    return state


def make_workspace(ws, n, layout, run_id):
    write(os.path.join(ws, "kiln.toml"),
          f'[[import]]\nlayout = "{layout}"\nref = "docker.io/kiln/busybox:latest"\n')
    for i in range(n):
        d = os.path.join(ws, f"p{i:02}")
        write(os.path.join(d, "build.yml"), f"org: bench\nimage: p{i:02}\narches:\n  - amd64\n  - arm64\n")
        write(os.path.join(d, "Dockerfile"),
              "FROM kiln/busybox:latest\nCOPY file /file\nRUN cat /file > /copied\n")
        write(os.path.join(d, "file"), f"package {i} {run_id}\n")


def big_layout(path, size):
    """An OCI layout with one image whose one layer is `size` random bytes."""
    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs)
    h = hashlib.sha256()
    tmp = os.path.join(blobs, "tmp")
    with open(tmp, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    layer = h.hexdigest()
    os.rename(tmp, os.path.join(blobs, layer))

    def put(obj):
        data = json.dumps(obj, separators=(",", ":")).encode()
        d = hashlib.sha256(data).hexdigest()
        write(os.path.join(blobs, d), data)
        return d, len(data)

    cfg, cfg_len = put({"architecture": "amd64", "os": "linux",
                        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer}"]}})
    man, man_len = put({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                   "digest": f"sha256:{cfg}", "size": cfg_len},
                        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                    "digest": f"sha256:{layer}", "size": size}]})
    write(os.path.join(path, "oci-layout"), '{"imageLayoutVersion":"1.0.0"}')
    write(os.path.join(path, "index.json"), json.dumps(
        {"schemaVersion": 2, "manifests": [{"mediaType": OCI_MANIFEST, "digest": f"sha256:{man}",
                                            "size": man_len,
                                            "annotations": {"org.opencontainers.image.ref.name": "big"}}]}))


def get_manifest(addr, repo, ref):
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=600)
    c.request("GET", f"/v2/{repo}/manifests/{ref}",
              headers={"Accept": f"{OCI_MANIFEST}, {INDEX}"})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, body


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--packages", type=int, default=50)
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--kilnd", default=os.path.join(ROOT, "target/release/kilnd"))
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target/release/kiln"))
    args = ap.parse_args()
    layout = os.path.join(os.environ.get("KILN_BASE_DIR", "/var/lib/kiln/base"), "busybox")
    if not os.path.isdir(layout):
        die(f"no busybox base at {layout}: run scripts/setup (or scripts/base-images)")
    with scratch("kiln-bench-upstream-", bool(os.environ.get("KILN_BENCH_KEEP"))) as (work, procs):
        up = Upstream(work)
        procs.append(up.proc)
        n = args.packages
        ws = os.path.join(work, "ws")
        make_workspace(ws, n, layout, f"{os.getpid()}-{time.time_ns()}")
        print(f"upstream {up.addr}; {n} packages x 2 arches; kilnd {args.kilnd}; work {work}")
        print(f"load average before: {load()}")

        a = Kilnd(args, work, "a", ws, ["--upstream", up.addr, "--push"])
        procs.append(a.proc)
        at, _ = wait_all_ok_on_events(a, n, 3600)
        build_s = at - a.t0
        print(f"build all ({n} x 2 targets, kilnd A, empty cache): {build_s:8.2f} s "
              f"(load {load()})", flush=True)

        def pushed():
            s = a.status()
            return s and len([p for p in s.get("pushes", {}).values() if not p.get("error")]) == n

        wait("A to push every package", pushed, 1800, 0.2)
        a.stop()

        seen, up_cpu = len(up.requests()), cpu_s(up.proc.pid)
        b = Kilnd(args, work, "b", ws, ["--upstream", up.addr])
        procs.append(b.proc)
        at, state = wait_all_ok_on_events(b, n, 1800)
        fetch_s = at - b.t0
        b_cpu, up_cpu = cpu_s(b.proc.pid), cpu_s(up.proc.pid) - up_cpu
        made = up.requests()[seen:]
        built_on_b = [f"{name}/{arch}" for name, p in state["packages"].items()
                      for arch, t in p["targets"].items()
                      if not (t.get("last") or {}).get("pulled_from")]
        print(f"fetch all ({n} x 2 targets, kilnd B, empty cache):  {fetch_s:8.2f} s "
              f"(ready after {b.ready_s:.2f} s; load {load()}); "
              f"built on B: {len(built_on_b)}")
        print(f"  kilnd B made {len(made)} requests to the upstream: "
              f"{sum(u == '/v2/' for u in made)} GET /v2/ probes, "
              f"{sum('/manifests/' in u for u in made)} manifests, "
              f"{sum('/blobs/' in u for u in made)} blobs "
              f"({len(set(u for u in made if '/blobs/' in u))} distinct); "
              f"CPU until all served: kilnd B {b_cpu:.2f} s, upstream {up_cpu:.2f} s")
        print(f"ratio build/fetch: {build_s / fetch_s:.1f}x (target >= 20x)", flush=True)

        # What the lazy fetch deferred: one target's manifest and blobs, read through B on
        # first use.
        first = sorted(state["packages"])[0]
        target = f"{first}:{state['packages'][first]['tag']}-amd64"
        for attempt in ("first", "again"):
            seen = len(up.requests())
            out = os.path.join(work, f"copy-{attempt}")
            t = time.monotonic()
            subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                            f"docker://{b.addr}/{target}", f"oci:{out}:x"],
                           check=True, capture_output=True)
            copy_s = time.monotonic() - t
            made = up.requests()[seen:]
            blobs = sum("/blobs/" in u for u in made)
            manifests = sum("/manifests/" in u for u in made)
            print(f"  deferred: skopeo copy of {target} from kilnd B ({attempt}): "
                  f"{copy_s:.2f} s, {manifests} manifest and {blobs} blob requests to the "
                  f"upstream")
            shutil.rmtree(out)

        # The 256 MiB image.
        big = os.path.join(work, "big")
        big_layout(big, args.big_mib << 20)
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{big}:big",
                        f"docker://{up.addr}/bench/big:1"], check=True, capture_output=True)
        empty = os.path.join(work, "empty")
        os.makedirs(empty)
        times_k, times_s = [], []
        for i in range(3):
            t = time.monotonic()
            out = os.path.join(work, f"skopeo-{i}")
            subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                            f"docker://{up.addr}/bench/big:1", f"oci:{out}:big"],
                           check=True, capture_output=True)
            times_s.append(time.monotonic() - t)
            shutil.rmtree(out)
            k = Kilnd(args, work, f"big-{i}", empty, ["--upstream", up.addr])
            procs.append(k.proc)
            t = time.monotonic()
            status, body = get_manifest(k.addr, "bench/big", "1")
            times_k.append(time.monotonic() - t)
            if status != 200:
                die(f"kilnd did not fetch bench/big:1: {status} {body[:300]!r}")
            k.stop()
            shutil.rmtree(k.dir)
        print(f"{args.big_mib} MiB image, skopeo copy docker:// -> oci: : "
              f"{', '.join(f'{x:.2f}' for x in times_s)} s (best {min(times_s):.2f})")
        print(f"{args.big_mib} MiB image, kilnd fetch into its cache:       "
              f"{', '.join(f'{x:.2f}' for x in times_k)} s (best {min(times_k):.2f})")
        print(f"ratio kilnd/skopeo (best of 3): {min(times_k) / min(times_s):.2f} (target <= 1); "
              f"load average after: {load()}")


if __name__ == "__main__":
    main()
