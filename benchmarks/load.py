"""Load benchmark of the hot forwarding path: wrk against a backend directly and through gatewise.

    .venv/bin/python benchmarks/load.py [--duration 5] [--connections 50] [--repeat 3]
                                        [--src DIR ...] [--json FILE]

Starts one backend (`python -m proxy faults --mode ok`: `GET /` answers "hello\\n") and one
gatewise per `--src` tree (`python -m proxy run --to http://BACKEND --listen 127.0.0.1:0`),
pins gatewise to CPU 0 and the backend and wrk to CPU 1 when `taskset` exists and there are
at least 2 CPUs, warms up, then runs `wrk -t1 -cC -dDs` against the backend directly and
against every gatewise, interleaved, `--repeat` times. It reports medians of:

- req/s direct and req/s through gatewise, and their ratio (proxy / direct);
- gatewise CPU us per request: utime+stime of the gatewise process from /proc/<pid>/stat,
  sampled just before and just after wrk, divided by the responses wrk counted;
- wrk's p50/p99 latency.

`--src DIR` runs gatewise from another checkout (cwd=DIR, PYTHONPATH=DIR; the script checks
that `import proxy` really resolves inside DIR). Repeat it to compare trees in one
interleaved run, e.g. before/after a change:

    git clone -q /work/main /tmp/before && git -C /tmp/before checkout -q <commit>
    .venv/bin/python benchmarks/load.py --src /tmp/before --src .

The backend runs from the first `--src` tree (or `--backend-src DIR`), the same for every
`--src` in the run. Every process is stopped at the end (SIGTERM, then SIGKILL); wrk stops by itself.
Needs wrk (`apt-get install -y wrk`). Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- processes ----------------------------------------------------------------------------

def _pin(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env.pop("PYTHONSTARTUP", None)
    return env


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, what: str, timeout: float = 15.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text(errors="replace"))
        if m:
            return m
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start (exit={proc.poll()}):\n{path.read_text(errors='replace')[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _check_imports(python: str, tree: Path) -> str | None:
    """None when `import proxy, diagnostics` resolves inside tree, else what went wrong."""
    code = ("import os, proxy, diagnostics\n"
            "for m in (proxy, diagnostics): print(os.path.dirname(os.path.abspath(m.__file__)))")
    out = subprocess.run([python, "-c", code], cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
    got = [Path(line) for line in out.stdout.split()]
    want = [tree / "proxy", tree / "diagnostics"]
    return None if got == want else f"resolves to {', '.join(map(str, got))}"


def _commit(tree: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(tree), "status", "--porcelain", "--untracked-files=no", "--", "proxy"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("+dirty(proxy/)" if dirty else "")


def _cpu_seconds(pid: int) -> float:
    """utime+stime of the process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --- wrk ------------------------------------------------------------------------------------

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(m[1]) * _UNIT[m[2]] if m else float("nan")


def run_wrk(url: str, duration: int, connections: int, cpu: int | None) -> dict:
    cmd = _pin(cpu) + ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    text = out.stdout
    if out.returncode != 0 or "Requests/sec" not in text:
        raise RuntimeError(f"wrk failed ({out.returncode}): {text}{out.stderr}")
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    requests, elapsed = int(m[1]), _ms(m[2] + m[3]) / 1e3
    pct = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)", text, re.M))
    socket_errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)",
                                                   (re.search(r"Socket errors:.*", text) or [""])[0]))
    non2xx = int((re.search(r"Non-2xx or 3xx responses: (\d+)", text) or [0, 0])[1])
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text)[1])
    return {"requests": requests, "seconds": elapsed, "rps": rps,
            "p50_ms": _ms(pct.get("50", "")), "p99_ms": _ms(pct.get("99", "")),
            "socket_errors": socket_errors, "non_2xx": non2xx}


# --- the benchmark -----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=int, default=5, help="whole seconds per measured wrk run (default 5)")
    p.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved repetitions; medians are reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="whole seconds of wrk per target before measuring (default 1; 0: none)")
    p.add_argument("--src", action="append", type=Path, metavar="DIR",
                   help="run gatewise from this tree (repeatable; default: this checkout)")
    p.add_argument("--backend-src", type=Path, metavar="DIR",
                   help="tree the backend (`python -m proxy faults`) runs from (default: the first --src)")
    p.add_argument("--python", default=sys.executable, help="interpreter for backend and gatewise (default: this one)")
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)

    if shutil.which("wrk") is None:
        print("load.py: wrk not found (apt-get install -y wrk)", file=sys.stderr)
        return 2
    srcs = [s.resolve() for s in (args.src or [ROOT])]
    labels = [s.name if len(srcs) > 1 and len({x.name for x in srcs}) == len(srcs) else str(s) for s in srcs]
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    proxy_cpu, load_cpu = (0, 1) if pin else (None, None)

    backend_src = (args.backend_src or srcs[0]).resolve()
    for tree in dict.fromkeys(srcs + [backend_src]):
        problem = _check_imports(args.python, tree)
        if problem:
            print(f"load.py: `import proxy, diagnostics` in {tree}: {problem}", file=sys.stderr)
            return 2

    tmp = Path(tempfile.mkdtemp(prefix="gatewise-load-"))
    procs: list[subprocess.Popen] = []
    results: dict = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "duration": args.duration, "connections": args.connections, "repeat": args.repeat,
        "warmup": args.warmup, "pinned": pin, "cpus": os.cpu_count(), "python": platform.python_version(),
        "kernel": platform.release(), "load_generator": "wrk -t1",
        "backend_src": {"path": str(backend_src), "commit": _commit(backend_src)},
        "srcs": [{"label": lab, "path": str(s), "commit": _commit(s)} for lab, s in zip(labels, srcs)],
        "runs": [],
    }
    try:
        # backend: one tree for every --src, on the load generator's CPU
        out = tmp / "backend.out"
        with open(out, "w") as f:
            backend = subprocess.Popen(_pin(load_cpu) + [args.python, "-m", "proxy", "faults",
                                                         "--listen", "127.0.0.1:0", "--mode", "ok"],
                                       cwd=backend_src, env=_env(backend_src), stdout=f, stderr=subprocess.STDOUT)
        procs.append(backend)
        bport = int(_wait_for(out, r"listening on 127\.0\.0\.1:(\d+)", backend, "backend")[1])
        targets = [("direct", f"http://127.0.0.1:{bport}/", None)]

        for i, (label, src) in enumerate(zip(labels, srcs)):
            err = tmp / f"proxy{i}.err"
            with open(err, "w") as f:
                proc = subprocess.Popen(_pin(proxy_cpu) + [args.python, "-m", "proxy", "run",
                                                           "--to", f"http://127.0.0.1:{bport}",
                                                           "--listen", "127.0.0.1:0"],
                                        cwd=src, env=_env(src), stdout=subprocess.DEVNULL, stderr=f)
            procs.append(proc)
            pport = int(_wait_for(err, r'"event":\s*"listening".*?"address":\s*"127\.0\.0\.1:(\d+)"', proc, label)[1])
            targets.append((label, f"http://127.0.0.1:{pport}/", proc))

        for name, url, _ in targets:   # sanity: the right body, then warm up
            body = urllib.request.urlopen(url, timeout=5).read()
            if body != b"hello\n":
                raise RuntimeError(f"{name}: unexpected body {body!r}")
            if args.warmup > 0:
                run_wrk(url, args.warmup, args.connections, load_cpu)

        for rep in range(args.repeat):
            for name, url, proc in targets:
                before = _cpu_seconds(proc.pid) if proc else 0.0
                r = run_wrk(url, args.duration, args.connections, load_cpu)
                if proc:
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited during the run")
                    r["cpu_s"] = _cpu_seconds(proc.pid) - before
                    r["cpu_us_per_req"] = r["cpu_s"] / r["requests"] * 1e6 if r["requests"] else float("nan")
                r.update(target=name, rep=rep)
                results["runs"].append(r)
                print(f"  run {rep + 1}/{args.repeat} {name:>10}: {r['rps']:9,.0f} req/s"
                      + (f"  {r['cpu_us_per_req']:6.1f} us/req" if proc else "")
                      + (f"  ERRORS socket={r['socket_errors']} non2xx={r['non_2xx']}"
                         if r["socket_errors"] or r["non_2xx"] else ""), file=sys.stderr, flush=True)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results["runs"] if r["target"] == name)

    direct = med("direct", "rps")
    summary = {"direct": {"rps": direct, "p50_ms": med("direct", "p50_ms"), "p99_ms": med("direct", "p99_ms")}}
    for name, _, _ in targets[1:]:
        summary[name] = {"rps": med(name, "rps"), "cpu_us_per_req": med(name, "cpu_us_per_req"),
                         "p50_ms": med(name, "p50_ms"), "p99_ms": med(name, "p99_ms"),
                         "ratio_to_direct": med(name, "rps") / direct}
    results["median"] = summary
    errors = sum(r["socket_errors"] + r["non_2xx"] for r in results["runs"])
    results["errors"] = errors

    print(f"\nGET / c{args.connections}, wrk -t1, {args.repeat} x {args.duration:g} s interleaved, medians; "
          f"{'gatewise on CPU 0, backend + wrk on CPU 1' if pin else 'not pinned'}")
    for s in results["srcs"]:
        print(f"  gatewise {s['label']}: {s['path']} @ {s['commit'] or '?'}")
    print(f"  backend: {results['backend_src']['path']} @ {results['backend_src']['commit'] or '?'}")
    print("| target | req/s | CPU us/request | proxy/direct req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    print(f"| direct (backend) | {direct:,.0f} | - | 1.00 | {summary['direct']['p50_ms']:.2f} "
          f"| {summary['direct']['p99_ms']:.2f} |")
    for name, _, _ in targets[1:]:
        s = summary[name]
        print(f"| gatewise {name if len(targets) > 2 else ''}".rstrip() + f" | {s['rps']:,.0f} | "
              f"{s['cpu_us_per_req']:.1f} | {s['ratio_to_direct']:.2f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} |")
    if len(targets) > 2:
        base = summary[targets[1][0]]
        for name, _, _ in targets[2:]:
            s = summary[name]
            print(f"{name} vs {targets[1][0]}: CPU/request x{s['cpu_us_per_req'] / base['cpu_us_per_req']:.2f}, "
                  f"req/s x{s['rps'] / base['rps']:.2f}")
    if errors:
        print(f"WARNING: {errors} socket errors / non-2xx responses across the runs (see --json)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
