#!/usr/bin/env python3
"""Focused bench of the merge script's dirty path: Redis CPU per EVALSHA.

Start a private server and run, e.g.:

    redis-server --port 7391 --save '' --appendonly no --daemonize yes
    python3 scripts/merge_script_bench.py 7391 src/replicate/wire/merge.lua 1 1000 10
    python3 scripts/merge_script_bench.py 7391 src/replicate/wire/merge.lua 100 1000 10 --renew 0

Arguments: PORT SCRIPT N B ROUNDS. Fills B budget keys with N node fields (plus their
`~owner:` fields and `~total`), our lease held, then sends ROUNDS x B `EVALSHA` calls where node
`n0` raised its total by 1 (a dirty budget, one window), through `redis-cli --pipe`, and prints
the `INFO cpu` delta per call (Redis's whole work: protocol, script, reply) and
`usec_per_call` of `INFO commandstats`. `--base V`: the node totals start at V (digits
matter for the arithmetic); `--renew 0|1`: pass the lease-renewal flag (`ARGV[8]`; omit it
for a script without that argument). FLUSHALLs the server.

Figures: docs/performance.md ("The merge script alone").
"""
import argparse
import hashlib
import subprocess

p = argparse.ArgumentParser()
p.add_argument("port")
p.add_argument("script")
p.add_argument("n", type=int)
p.add_argument("b", type=int)
p.add_argument("rounds", type=int)
p.add_argument("--base", type=int, default=1000)
p.add_argument("--renew", choices=["0", "1"])
a = p.parse_args()
src = open(a.script).read()
sha = hashlib.sha1(src.encode()).hexdigest()


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for x in args:
        x = str(x).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(x), x))
    return b"".join(out)


def cli(*args):
    return subprocess.run(["redis-cli", "-p", a.port, *map(str, args)],
                          capture_output=True, text=True, check=True).stdout


def pipe(buf):
    subprocess.run(["redis-cli", "-p", a.port, "--pipe"], input=buf,
                   capture_output=True, check=True)


def cpu():
    d = dict(l.split(":", 1) for l in cli("INFO", "cpu").splitlines() if ":" in l)
    return float(d["used_cpu_sys"]) + float(d["used_cpu_user"])


cli("FLUSHALL")
cli("SCRIPT", "LOAD", src)
buf = []
for b in range(a.b):
    fields = []
    for n in range(a.n):
        fields += [f"n{n}", a.base, f"~owner:n{n}", f"i{n}"]
    buf.append(resp("HSET", f"pb:{{p{b}:1h}}:0", *fields, "~total", a.base * a.n))
    buf.append(resp("SET", f"pb:{{p{b}:1h}}:lease:n0", "i0", "PX", 600000))
pipe(b"".join(buf))
buf = []
for r in range(a.rounds):
    for b in range(a.b):
        t = f"pb:{{p{b}:1h}}"
        argv = ["n0", "i0", 7000, 0, 0, 0, 0] + ([a.renew] if a.renew else [])
        buf.append(resp("EVALSHA", sha, 3, f"{t}:lease:n0", f"{t}:strict", f"{t}:0", *argv,
                        a.base + r + 1, 4102444800, "", 0, 0))
cli("CONFIG", "RESETSTAT")
c0 = cpu()
pipe(b"".join(buf))
c1 = cpu()
calls = a.rounds * a.b
stat = [l for l in cli("INFO", "commandstats").splitlines() if l.startswith("cmdstat_evalsha")]
print(f"N={a.n} B={a.b}: {(c1 - c0) * 1e6 / calls:.2f} us Redis CPU per call; {stat[0] if stat else ''}")
total = cli("HGET", "pb:{p0:1h}:0", "~total").strip()
assert total == str(a.base * a.n + a.rounds), f"~total {total}"
