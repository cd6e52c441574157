#!/usr/bin/env python3
"""The engine of scripts/bench-scale: what kilnd costs as the workspace and the cache grow.

1. A git workspace of N packages (`scale/pK`, amd64 + arm64, `FROM scratch`, `COPY src
   /src`, four small files each), committed. A release kilnd (native builder) starts on it
   with an empty cache; timed from its start until every package's `dev` is served (the
   event stream says every target landed; then each `dev` is checked with a HEAD that
   must answer a two-arch index). kilnd's CPU (user + system) at that moment and its
   peak RSS (VmHWM) are reported.
2. In that workspace, saves and reverts of one package's file: a save is timed from the
   write until `dev` answers a new index holding both arches, a revert until `dev`
   answers the previous digest again (served from the cache). The same in a one-package
   workspace, in the same run: the ratios say what the size of the workspace and the
   cache costs a save and a revert.

3. The real dashboard (`kiln`, release) in a private tmux server against the big
   workspace's kilnd: the time until its first screen shows every package, the time and
   CPU per key of scrolling (`j`, each key handled and drawn before the next) and of
   typing a filter, and its CPU over 10 s of idle (nothing builds, nothing pressed).

Targets (2 cores, N = 1000): all 2N targets served in <= 20 s, peak RSS <= 150 MiB,
save and revert in the big workspace within 1.2x of the one-package figures, the
dashboard idle at 0 CPU.

Timestamps: time.monotonic(); `dev` is polled with HEAD in a tight loop on one
kept-alive connection (no sleep between HEADs).
"""

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import time

from benchlib import Registry, die, load, scratch, write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=600)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(600)
        self.sock.connect(self.path)


def proc_cpu_ms(pid):
    """User + system CPU of a process, in ms."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return 1000 * (int(fields[11]) + int(fields[12])) / ticks


def proc_peak_rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def make_workspace(ws, n, run_id):
    os.makedirs(ws)
    for i in range(n):
        d = os.path.join(ws, f"p{i}")
        os.makedirs(os.path.join(d, "src"))
        write(os.path.join(d, "build.yml"), f"org: scale\nimage: p{i}\narches:\n  - amd64\n  - arm64\n")
        write(os.path.join(d, "Dockerfile"), "FROM scratch\nCOPY src /src\n")
        for name in "abcd":
            write(os.path.join(d, "src", name), f"{name} of package {i} {run_id}\n")
    # gc.auto=0: committing ~8,000 loose objects would start `git gc --auto` in the
    # background, which packs them while kilnd builds and takes CPU from the figures.
    git = ["git", "-C", ws, "-c", "user.name=bench", "-c", "user.email=bench@localhost",
           "-c", "gc.auto=0"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "workspace"], check=True)


class Kilnd:
    def __init__(self, args, work, ws, procs):
        self.work = work
        self.ready = os.path.join(work, "ready.json")
        self.socket = os.path.join(work, "kilnd.sock")
        self.log_path = os.path.join(work, "kilnd.log")
        log = open(self.log_path, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [args.kilnd, "--cache", os.path.join(work, "cache"), "--listen", "127.0.0.1:0",
             "--socket", self.socket, "--ready-file", self.ready, "--builder", "native", ws],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
        procs.append(self.proc)
        end = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                die(f"kilnd exited: {open(self.log_path).read()[-2000:]}")
            try:
                self.addr = json.load(open(self.ready))["registry"][0]
                break
            except (OSError, ValueError, KeyError, IndexError):
                pass
            if time.monotonic() > end:
                die("kilnd did not become ready in 120 s")
            time.sleep(0.01)
        self.reg = Registry(self.addr)

    def wait_all_landed(self, packages, arches, seconds):
        """Follows the event stream until every (package, arch) has landed; returns the
        monotonic time of that."""
        want = {(p, a) for p in packages for a in arches}
        conn = UnixHTTP(self.socket)
        conn.request("GET", "/api/v1/events")
        r = conn.getresponse()
        if r.status != 200:
            die(f"GET /api/v1/events: {r.status}")
        end = time.monotonic() + seconds
        done = set()
        while True:
            line = r.readline()
            if not line:
                die("the event stream ended")
            item = json.loads(line)
            if item["kind"] == "snapshot":
                done = {(name, arch) for name, p in item["snapshot"]["packages"].items()
                        for arch, t in p["targets"].items() if t["status"] == "ok"}
            else:
                ev = item["event"]
                kind = ev["type"]
                if kind in ("finished", "served_from_cache"):
                    done.add((ev["package"], ev["arch"]))
                elif kind == "failed":
                    die(f"{ev['package']} ({ev['arch']}) failed: {ev['summary'].get('error')}")
            if want <= done:
                t = time.monotonic()
                conn.close()
                return t
            if time.monotonic() > end:
                die(f"timed out after {seconds}s: {len(done & want)} of {len(want)} targets landed")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def poll_dev(reg, repo, accept, seconds=120):
    """Tight HEAD loop on `dev` until `accept(digest)`; returns (monotonic time, digest)."""
    end = time.monotonic() + seconds
    while True:
        status, digest, _ = reg.head(repo, "dev")
        now = time.monotonic()
        if status == 200 and accept(digest):
            return now, digest
        if now > end:
            die(f"timed out after {seconds}s: {repo}:dev answers {status} {digest}")


def edit_loop(kilnd, ws, pkg, rounds, run_id, label):
    """Saves of pkg's src/a (new content: both arches built and served as dev) and
    reverts (the previous content: dev back at its digest). Returns (saves, reverts) in ms."""
    repo = f"scale/{pkg}"
    path = os.path.join(ws, pkg, "src", "a")
    reg = kilnd.reg
    _, dev0, _ = reg.head(repo, "dev")
    prev_content, prev_digest = open(path).read(), dev0
    saves, reverts = [], []
    for i in range(rounds + 1):
        content = f"save {i} {label} {run_id}\n"
        seen = {prev_digest}

        def two_arch_new(digest):
            if digest in seen:
                return False
            seen.add(digest)
            return reg.arches(repo, digest) == ["amd64", "arm64"]

        t0 = time.monotonic()
        write(path, content)
        t1, digest = poll_dev(reg, repo, two_arch_new)
        t2 = time.monotonic()
        write(path, prev_content)
        t3, _ = poll_dev(reg, repo, lambda d: d == prev_digest)
        # Back to the new content (cached too) before the next round.
        write(path, content)
        poll_dev(reg, repo, lambda d: d == digest)
        if i > 0:  # the first round warms up
            saves.append(1000 * (t1 - t0))
            reverts.append(1000 * (t3 - t2))
            print(f"  {label}: save {i:2}: {saves[-1]:7.1f} ms   revert: {reverts[-1]:6.1f} ms", flush=True)
        prev_content, prev_digest = content, digest
    return saves, reverts


class Dashboard:
    """The real `kiln` dashboard against kilnd, in a private tmux server (160x50)."""

    def __init__(self, kiln, socket, work):
        self.tmux = ["tmux", "-L", f"kiln-scale-{os.getpid()}", "-f", "/dev/null"]
        env = {**os.environ, "XDG_STATE_HOME": os.path.join(work, "state"), "TERM": "xterm-256color"}
        self.t0 = time.monotonic()
        subprocess.run([*self.tmux, "new-session", "-d", "-s", "bench", "-x", "160", "-y", "50",
                        f"exec {kiln} --socket {socket}"], check=True, env=env)
        self.pid = int(subprocess.check_output(
            [*self.tmux, "list-panes", "-t", "bench", "-F", "#{pane_pid}"], text=True).split()[0])

    def screen(self):
        return subprocess.run([*self.tmux, "capture-pane", "-p", "-t", "bench"],
                              capture_output=True, text=True).stdout

    def wait(self, what, ok, seconds=60):
        """Polls the screen until `ok(screen)`; returns the monotonic time of that."""
        end = time.monotonic() + seconds
        while True:
            screen = self.screen()
            if ok(screen):
                return time.monotonic()
            if time.monotonic() > end:
                die(f"the dashboard did not show {what} in {seconds} s:\n{screen}")

    def keys(self, *keys):
        subprocess.run([*self.tmux, "send-keys", "-t", "bench", *keys], check=True)

    def selected(self, screen):
        """The package on the selected row (the one marked with ▶)."""
        for line in screen.splitlines():
            if "▶" in line:
                return line.split("▶", 1)[1].split()[0]
        return None

    def stop(self):
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)


def dashboard(args, kilnd, n, work):
    """First screen, scrolling, filtering and idle CPU of `kiln` on the big workspace.
    Returns a line of figures."""
    names = sorted(f"scale/p{i}" for i in range(n))
    d = Dashboard(args.kiln, kilnd.socket, work)
    try:
        t = d.wait(f"{n} packages, connected",
                   lambda s: f"packages ({n})" in s and "● connected" in s and "✓ ok" in s)
        first_ms = 1000 * (t - d.t0)
        # Scrolling: `j` pressed `steps` times, each handled and drawn before the next.
        steps = min(200, n - 1)
        cpu0, t0 = proc_cpu_ms(d.pid), time.monotonic()
        d.keys(*(["j"] * steps))
        t1 = d.wait(f"row {names[steps]} selected", lambda s: d.selected(s) == names[steps])
        j_ms, j_cpu = 1000 * (t1 - t0) / steps, (proc_cpu_ms(d.pid) - cpu0) / steps
        # Filtering: `f`, then each character of the filter re-filters every package.
        needle = f"p{n // 10 - 1}" if n >= 100 else "p0"
        shown = sum(1 for x in names if needle in x)
        cpu0, t0 = proc_cpu_ms(d.pid), time.monotonic()
        d.keys("f", *needle, "Enter")
        t1 = d.wait(f"the filter {needle!r}", lambda s: f'packages ({shown}) filter "{needle}"' in s)
        f_ms, f_cpu = 1000 * (t1 - t0) / (len(needle) + 2), (proc_cpu_ms(d.pid) - cpu0) / (len(needle) + 2)
        # Idle: nothing builds, nothing is pressed.
        cpu0 = proc_cpu_ms(d.pid)
        time.sleep(10)
        idle_ms = proc_cpu_ms(d.pid) - cpu0
    finally:
        d.stop()
    return (f"dashboard at {n} packages: first screen {first_ms:.0f} ms; `j` {j_ms:.2f} ms and "
            f"{j_cpu:.2f} ms CPU per key ({steps} keys); filter {f_ms:.2f} ms and {f_cpu:.2f} ms CPU "
            f"per key ({needle!r}: {shown} rows); idle CPU {idle_ms:.0f} ms in 10 s")


def med(xs):
    return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int, nargs="?", default=1000, help="packages (default 1000)")
    ap.add_argument("--rounds", type=int, default=10, help="timed saves and reverts in each workspace")
    ap.add_argument("--kilnd", default=os.environ.get("KILND", os.path.join(ROOT, "target/release/kilnd")))
    ap.add_argument("--kiln", default=os.environ.get("KILN", os.path.join(ROOT, "target/release/kiln")),
                    help="the dashboard to time in tmux (default target/release/kiln)")
    ap.add_argument("--no-dashboard", action="store_true", help="do not time the dashboard")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    run_id = f"{os.getpid()}-{time.time_ns()}"
    with scratch("kiln-scale-", args.keep) as (work, procs):
        run(args, work, procs, run_id)


def run(args, work, procs, run_id):
    n = args.n
    big = os.path.join(work, "big")
    t = time.monotonic()
    make_workspace(os.path.join(big, "ws"), n, run_id)
    print(f"workspace: {n} packages ({2 * n} targets), made in {time.monotonic() - t:.1f} s; "
          f"kilnd {args.kilnd}; load average {load()}", flush=True)

    k = Kilnd(args, big, os.path.join(big, "ws"), procs)
    ready_s = time.monotonic() - k.t0
    t_all = k.wait_all_landed([f"scale/p{i}" for i in range(n)], ["amd64", "arm64"], 600)
    cpu_ms = proc_cpu_ms(k.proc.pid)
    all_s = t_all - k.t0
    bad = []
    for i in range(n):
        if k.reg.arches(f"scale/p{i}", "dev") != ["amd64", "arm64"]:
            bad.append(f"scale/p{i}")
    if bad:
        die(f"{len(bad)} packages have no two-arch dev: {bad[:5]}")
    print(f"kilnd ready in {ready_s:.2f} s; all {2 * n} targets landed and every dev served "
          f"{all_s:.2f} s after kilnd started ({1000 * all_s / (2 * n):.1f} ms per target); "
          f"kilnd CPU {cpu_ms / 1000:.2f} s; load average {load()}", flush=True)

    board = "dashboard: not timed (--no-dashboard)" if args.no_dashboard else dashboard(args, k, n, big)
    print(board, flush=True)

    big_saves, big_reverts = edit_loop(k, os.path.join(big, "ws"), f"p{n // 2}", args.rounds, run_id, f"{n} packages")
    rss_kib = proc_peak_rss_kib(k.proc.pid)
    k.stop()

    small = os.path.join(work, "small")
    make_workspace(os.path.join(small, "ws"), 1, run_id)
    k1 = Kilnd(args, small, os.path.join(small, "ws"), procs)
    k1.wait_all_landed(["scale/p0"], ["amd64", "arm64"], 120)
    one_saves, one_reverts = edit_loop(k1, os.path.join(small, "ws"), "p0", args.rounds, run_id, "1 package")
    k1.stop()

    print()
    print(f"{n} packages: all {2 * n} targets served in {all_s:.2f} s (target <= 20 s for 1000), "
          f"kilnd CPU {cpu_ms / 1000:.2f} s, peak RSS {rss_kib / 1024:.1f} MiB (target <= 150 MiB)")
    s_big, s_one, r_big, r_one = med(big_saves), med(one_saves), med(big_reverts), med(one_reverts)
    print(f"save -> both arches served as dev, median of {args.rounds}: {n} packages {s_big:.1f} ms, "
          f"1 package {s_one:.1f} ms, ratio {s_big / s_one:.2f} (target <= 1.2)")
    print(f"revert -> dev at the cached index, median of {args.rounds}: {n} packages {r_big:.1f} ms, "
          f"1 package {r_one:.1f} ms, ratio {r_big / r_one:.2f} (target <= 1.2)")
    print(board)
    print(f"load average: {load()} (at the end; {os.cpu_count()} cores; other work on the machine counts)")


if __name__ == "__main__":
    main()
