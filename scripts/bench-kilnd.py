#!/usr/bin/env python3
"""The engine of scripts/bench-build and scripts/bench-loop: kilnd itself, timed from a
file save to its registry serving the new multi-arch index, against the by-hand loop
(`docker build` of one arch, `docker push` to Debian's docker-registry), in one run.

A temp workspace holds one package, `bench/pkg` (amd64 + arm64), FROM kiln/busybox:latest
(imported by kiln.toml from $KILN_BASE_DIR/busybox); its Dockerfile by `--package`:
    copy        COPY file /file
    run-late    RUN <a little work>, then COPY file /file   (a save re-runs no RUN)
    run-early   COPY file /file, then RUN <work reading it>  (a save re-runs the RUN)
The real kilnd (`--builder docker`: BuildKit through the engine; `auto`: the native
builder, RUN steps in runc) watches it, with its own cache, socket and a registry on
127.0.0.1:0. The by-hand loop builds the same Dockerfile.

kilnd, a save: the next content's tag is computed first (`kiln show-tag` on a scratch
copy: the tag does not depend on the directory), then t0, the file is written, and a
HEAD of /v2/bench/pkg/manifests/<tag> (Accept: OCI index) is repeated on one kept-alive
connection until it answers 200: the index is served.
kilnd, a revert: the file goes back to the previous content, whose tag is in the cache;
kilnd moves `dev` to it without building; t0 at the write, the end when HEAD of `dev`
answers the reverted index's digest.
By hand: t0 at the write; `docker build --platform linux/amd64` then `docker push` to a
docker-registry on 127.0.0.1:PORT; the end when the push returns (the target's
reference). Then the same for amd64 and arm64, each arch's build and push run in
parallel: the engine work kilnd does for one save, done by hand.

Timestamps: time.monotonic(); polling is a tight loop (no sleep between HEADs).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import time

from benchlib import Registry, die, scratch, write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER = os.environ.get("KILN_DOCKER", "/usr/bin/docker")
BASE_DIR = os.environ.get("KILN_BASE_DIR", "/var/lib/kiln/base")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait(what, pred, seconds):
    end = time.monotonic() + seconds
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            die(f"timed out after {seconds}s waiting for {what}")
        time.sleep(0.05)


def poll_until(reg, repo, ref, want_digest=None, seconds=600):
    """Tight HEAD loop until ref answers 200 (and want_digest, if given); returns
    (monotonic time, digest)."""
    end = time.monotonic() + seconds
    while True:
        status, digest, _ = reg.head(repo, ref)
        now = time.monotonic()
        if status == 200 and (want_digest is None or digest == want_digest):
            return now, digest
        if now > end:
            die(f"timed out after {seconds}s: {repo}:{ref} answers {status} {digest}")


# The benchmark packages' Dockerfiles, after their FROM line.
PACKAGES = {
    "copy": "COPY file /file\n",
    "run-late": "RUN i=0; while [ $i -lt 2000 ]; do echo \"line $i\"; i=$((i+1)); done > /work.txt && md5sum /work.txt > /work.md5\n"
                "COPY file /file\n",
    "run-early": "COPY file /file\n"
                 "RUN i=0; while [ $i -lt 2000 ]; do echo \"line $i\"; i=$((i+1)); done > /work.txt && cat /file >> /work.txt && md5sum /work.txt > /work.md5\n",
}


def show_tag(kiln, scratch, content):
    write(os.path.join(scratch, "file"), content)
    out = subprocess.run([kiln, "show-tag", scratch], check=True, capture_output=True, text=True).stdout
    return out.strip().rsplit(":", 1)[1]


def cpu_times():
    """(steal, total) jiffies from /proc/stat: a virtual machine's host may take CPU time
    from it (steal), which makes every figure slower and noisier."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return f[7] if len(f) > 7 else 0, sum(f[:8])


def stats(xs):
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) >= 2 else [xs[0]] * 9
    return {
        "n": len(xs), "median": statistics.median(xs), "min": xs[0], "max": xs[-1],
        "p10": q[0], "p90": q[-1],
        "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
    }


def fmt(s):
    return (f"median {s['median']:8.1f} ms   min {s['min']:7.1f}   p10 {s['p10']:7.1f}   "
            f"p90 {s['p90']:7.1f}   max {s['max']:7.1f}   stdev {s['stdev']:6.1f}   (n={s['n']})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--saves", type=int, default=20, help="timed saves (new content) per loop")
    ap.add_argument("--reverts", type=int, default=0, help="timed reverts (cached content)")
    ap.add_argument("--hand", type=int, default=None, help="timed by-hand iterations (default: --saves)")
    ap.add_argument("--kilnd", default=os.environ.get("KILND", os.path.join(ROOT, "target/debug/kilnd")))
    ap.add_argument("--kiln", default=os.environ.get("KILN", os.path.join(ROOT, "target/debug/kiln")))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--atomic", action="store_true",
                    help="save as JetBrains' safe write and vim's backupcopy=no do: write a temporary "
                         "file beside it, then rename it into place (default: write in place)")
    ap.add_argument("--builder", default="docker", choices=["docker", "native", "auto"],
                    help="kilnd's builder (default docker: BuildKit through the engine)")
    ap.add_argument("--package", default="copy", choices=sorted(PACKAGES),
                    help="the benchmark package (default copy: one COPY)")
    ap.add_argument("--kilnd-arg", action="append", default=[],
                    help="one more argument for kilnd (repeatable), e.g. --kilnd-arg=--engine=linux/arm64=unix:///x.sock")
    args = ap.parse_args()
    hand_n = args.saves if args.hand is None else args.hand

    if subprocess.run([DOCKER, "info"], capture_output=True).returncode != 0:
        die(f"the Docker engine does not answer ({DOCKER} info); start dockerd (scripts/setup)")
    if not shutil.which("docker-registry"):
        die("docker-registry is not installed (scripts/setup)")
    layout = os.path.join(BASE_DIR, "busybox")
    if not os.path.exists(os.path.join(layout, "index.json")):
        die(f"no busybox base at {layout}: run scripts/setup")

    args.cpu0 = cpu_times()
    with scratch("kiln-bench-", args.keep) as (work, procs):
        run(args, hand_n, work, procs, layout)


def run(args, hand_n, work, procs, layout):
    ws = os.path.join(work, "ws")
    pkg = os.path.join(ws, "pkg")
    scratch = os.path.join(work, "scratch", "pkg")
    for d in (pkg, scratch):
        os.makedirs(d)
        write(os.path.join(d, "build.yml"), "org: bench\nimage: pkg\narches:\n  - amd64\n  - arm64\n")
        write(os.path.join(d, "Dockerfile"), "FROM kiln/busybox:latest\n" + PACKAGES[args.package])
    write(os.path.join(ws, "kiln.toml"),
          f'[[import]]\nlayout = "{layout}"\nref = "docker.io/kiln/busybox:latest"\n')
    run_id = f"{os.getpid()}-{time.time_ns()}"
    content0 = f"initial {run_id}\n"
    write(os.path.join(pkg, "file"), content0)
    tag0 = show_tag(args.kiln, scratch, content0)

    ready = os.path.join(work, "ready.json")
    log = open(os.path.join(work, "kilnd.log"), "w")
    kilnd = subprocess.Popen(
        [args.kilnd, "--cache", os.path.join(work, "cache"), "--listen", "127.0.0.1:0",
         "--socket", os.path.join(work, "kilnd.sock"), "--ready-file", ready,
         "--builder", args.builder, *args.kilnd_arg, ws],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
    procs.append(kilnd)

    def ready_addr():
        if kilnd.poll() is not None:
            die(f"kilnd exited: {open(os.path.join(work, 'kilnd.log')).read()[-2000:]}")
        try:
            return json.load(open(ready))["registry"][0]
        except (OSError, ValueError, KeyError, IndexError):
            return None

    addr = wait("kilnd's ready file", ready_addr, 60)
    reg = Registry(addr)
    quiet = os.environ.get("KILN_QUIET_MS", "50 (default)")
    print(f"kilnd {args.kilnd} (pid {kilnd.pid}), registry {addr}, builder {args.builder}, package {args.package}, "
          f"quiet window {quiet} ms, saves {'renamed into place' if args.atomic else 'written in place'}, work {work}")
    t = time.monotonic()
    poll_until(reg, "bench/pkg", tag0, seconds=600)
    print(f"first build (warm-up, both arches): {1000 * (time.monotonic() - t):.0f} ms")

    # A warm-up save: BuildKit's and the engine's caches as in a working session.
    content = f"warm {run_id}\n"
    tag = show_tag(args.kiln, scratch, content)
    t0 = time.monotonic()
    write(os.path.join(pkg, "file"), content)
    t1, _ = poll_until(reg, "bench/pkg", tag)
    print(f"warm-up save: {1000 * (t1 - t0):.0f} ms")
    prev = (content, tag)

    def save(text):
        path = os.path.join(pkg, "file")
        if args.atomic:
            write(path + "___jb_tmp___", text)
            os.replace(path + "___jb_tmp___", path)
        else:
            write(path, text)

    saves, reverts = [], []
    for i in range(args.saves):
        content = f"save {i} {run_id}\n"
        tag = show_tag(args.kiln, scratch, content)
        t0 = time.monotonic()
        save(content)
        t1, digest = poll_until(reg, "bench/pkg", tag)
        saves.append(1000 * (t1 - t0))
        print(f"  save {i + 1:2}: {saves[-1]:8.1f} ms  {tag[:12]} {digest[:19]}", flush=True)
        if i < args.reverts:
            # Wait until dev follows the new build (it moves after the index), then revert.
            poll_until(reg, "bench/pkg", "dev", want_digest=digest)
            _, old_digest, _ = reg.head("bench/pkg", prev[1])
            t0 = time.monotonic()
            save(prev[0])
            t1, _ = poll_until(reg, "bench/pkg", "dev", want_digest=old_digest, seconds=60)
            reverts.append(1000 * (t1 - t0))
            print(f"  revert {i + 1:2}: {reverts[-1]:6.1f} ms  {prev[1][:12]} {old_digest[:19]} (served from cache)", flush=True)
            # Back to the new content (its tag is cached too) before the next save.
            save(content)
            poll_until(reg, "bench/pkg", "dev", want_digest=digest, seconds=60)
        prev = (content, tag)

    status, index = reg.get_json("bench/pkg", prev[1])
    if status != 200 or len(index.get("manifests", [])) != 2:
        die(f"the last index is not a two-arch index: {status} {index}")
    platforms = sorted(m["platform"]["architecture"] for m in index["manifests"])
    print(f"last index: {index.get('mediaType')} with {platforms}")
    kilnd.send_signal(signal.SIGTERM)
    kilnd.wait(30)
    if hand_n == 0:
        print()
        kilnd_summary(args, saves, reverts)
        return

    # By hand, with the same engine: docker build (amd64) + docker push to docker-registry.
    port = free_port()
    hand_addr = f"127.0.0.1:{port}"
    write(os.path.join(work, "registry.yml"),
          f"version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
          f"storage:\n  filesystem:\n    rootdirectory: {work}/registry\nhttp:\n  addr: {hand_addr}\n")
    rlog = open(os.path.join(work, "registry.log"), "w")
    registry = subprocess.Popen(["docker-registry", "serve", os.path.join(work, "registry.yml")],
                                stdout=rlog, stderr=subprocess.STDOUT)
    procs.append(registry)
    hreg = Registry(hand_addr)
    wait("docker-registry", lambda: hreg.head("none/none", "x")[0] in (404, 401), 30)
    subprocess.run(["skopeo", "copy", "--all", "--quiet", "--dest-tls-verify=false",
                    f"oci:{layout}:docker.io/kiln/busybox:latest",
                    f"docker://{hand_addr}/kiln/busybox:latest"], check=True)
    hand = os.path.join(work, "hand")
    os.makedirs(hand)
    write(os.path.join(hand, "Dockerfile"), f"FROM {hand_addr}/kiln/busybox:latest\n" + PACKAGES[args.package])
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}

    def build_push(arches):
        """Both steps of the by-hand loop for `arches`, each arch in parallel: docker build,
        then docker push (as a user would script it for several arches)."""
        refs = {a: f"{hand_addr}/bench/pkg:hand-{a}" for a in arches}
        builds = [subprocess.Popen([DOCKER, "build", "-q", "--platform", f"linux/{a}", "--network", "none",
                                    "-t", refs[a], hand], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, env=env) for a in arches]
        pushes = []
        for a, b in zip(arches, builds):
            _, err = b.communicate()
            if b.returncode != 0:
                die(f"docker build ({a}) failed: {err.decode()[-2000:]}")
            pushes.append(subprocess.Popen([DOCKER, "push", "-q", refs[a]], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE))
        for a, p in zip(arches, pushes):
            _, err = p.communicate()
            if p.returncode != 0:
                die(f"docker push ({a}) failed: {err.decode()[-2000:]}")
        return refs

    def loop(arches, label):
        times = []
        for i in range(hand_n + 1):
            t0 = time.monotonic()
            write(os.path.join(hand, "file"), f"hand {label} {i} {run_id}\n")
            refs = build_push(arches)
            t1 = time.monotonic()
            if i == 0:
                print(f"by hand ({label}) warm-up: {1000 * (t1 - t0):.0f} ms")
            else:
                times.append(1000 * (t1 - t0))
                print(f"  by hand ({label}) {i:2}: {times[-1]:8.1f} ms", flush=True)
            # Untimed: the next build moves the tag, which would leave this image behind
            # (kilnd removes its own after each build).
            subprocess.run([DOCKER, "rmi", *refs.values()], capture_output=True)
        return times

    # The target's reference: one arch. For context: both arches the same way, each
    # arch's build and push in parallel (the engine work kilnd does for a save).
    by_hand = loop(["amd64"], "amd64")
    by_hand_both = loop(["amd64", "arm64"], "amd64+arm64")

    print()
    s, r = kilnd_summary(args, saves, reverts, end=False)
    h, hb = stats(by_hand), stats(by_hand_both)
    print(f"by hand, docker build amd64 + docker push:      {fmt(h)}")
    print(f"by hand, the same for amd64+arm64 in parallel:  {fmt(hb)}")
    target = {"run-late": 0.5}.get(args.package, 1.0)
    print(f"ratio kilnd(both arches) / by hand(one arch), medians: {s['median'] / h['median']:.2f} "
          f"(package {args.package}, builder {args.builder}; target <= {target})")
    print(f"ratio kilnd(both arches) / by hand(both arches), medians: {s['median'] / hb['median']:.2f}")
    if reverts:
        print(f"ratio kilnd revert / by hand, medians: {r['median'] / h['median']:.3f}")
    load_line(args)


def kilnd_summary(args, saves, reverts, end=True):
    """kilnd's figures and #16's targets for them: a revert served within 10 ms, a save
    of the native run-late package served for both arches within 40 ms (medians)."""
    s = stats(saves)
    print(f"kilnd, save -> new index served, amd64+arm64:  {fmt(s)}")
    r = None
    if reverts:
        r = stats(reverts)
        print(f"kilnd, revert -> cached index served (dev):    {fmt(r)}")
        print(f"revert median {'within' if r['median'] <= 10 else 'OVER'} the 10 ms target")
    if args.package == "run-late" and args.builder == "auto":
        print(f"save median {'within' if s['median'] <= 40 else 'OVER'} the 40 ms target "
              "(native, both arches)")
    if end:
        load_line(args)
    return s, r


def load_line(args):
    load = open("/proc/loadavg").read().split()[:3]
    steal, total = (b - a for a, b in zip(args.cpu0, cpu_times()))
    print(f"load average: {' '.join(load)} (at the end; {os.cpu_count()} cores); "
          f"CPU stolen by the host during the run: {100 * steal / max(total, 1):.0f}%; kilnd: {args.kilnd}")


if __name__ == "__main__":
    main()
