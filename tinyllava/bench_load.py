"""Benchmark under load: tinyllava beside other work on the same cores, with the threads runtime.py decides
against every fixed choice.

    python -m tinyllava.bench_load [--answers 3] [--json]

The work, as a user's script does it: load the stage-2 model through the library (load_llava), then time
`--answers` answers about a demo photo (each a fresh Llava.answer, greedy). Each scenario starts its processes
side by side and times the work in each:

    alone           one process
    busy loop       one process beside a Python loop that keeps one core busy
    two at once     two such processes
    load changes    one process answering 3x as many questions; a busy loop starts when it is a third done
                    and stops at two thirds (the threads must follow: runtime.adapt between answers)

each run with the threads decided (`auto`) and with every fixed count from 1 to the cores (TINYLLAVA_THREADS),
and reported as seconds and as a ratio to the best fixed choice of that scenario, and to one thread alone on an
idle machine (the issue's yardstick). Each process is a fresh Python; the model loads before the clock starts.
"""
import argparse
import json
import os
import subprocess
import sys
import time

WORKER = """
import sys, time
from tinyllava import runtime
from tinyllava.decoding import Sampling
from tinyllava.model import load_llava
from tinyllava.weights import demo_photos, stage2_paths
from tinyllava.image import preprocess
projector, adapter = stage2_paths()
llava = load_llava(projector, adapter=adapter, quantized=True)
tokens = llava.image_tokens(preprocess(demo_photos()["chelsea.png"])[None])[0]
llava.answer("Hi", sampling=Sampling(2))             # the compiled step loaded before the clock
n, questions = int(sys.argv[1]), ["What animal is in the picture?", "What color is it?", "Where is it?"]
print("ready", flush=True)
sys.stdin.readline()                                 # all processes start timing together
t0 = time.perf_counter()
for k in range(n):
    runtime.adapt()
    llava.answer(questions[k % 3], [tokens], sampling=Sampling(24))
    print(f"answer {k + 1} {time.perf_counter() - t0:.3f} threads {runtime.THREADS}", flush=True)
print(f"seconds {time.perf_counter() - t0:.3f}", flush=True)
"""
BUSY = "while True: pass"


def env_for(threads, layer=None):  # a worker's environment: its threads fixed, or decided by runtime.py ("auto")
    env = {k: v for k, v in os.environ.items() if k not in ("TINYLLAVA_THREADS", "NUMBA_NUM_THREADS",
                                                              "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    if threads != "auto":
        env["TINYLLAVA_THREADS"] = str(threads)
    if layer:
        env["NUMBA_THREADING_LAYER"] = layer
    return env


def run(threads, workers=1, busy=False, answers=3, changes=False, layer=None):
    """Start the workers (and a busy loop), let them time their answers together. -> [seconds] per worker"""
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(answers * (3 if changes else 1))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env_for(threads, layer))
             for _ in range(workers)]
    loop = None
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a worker failed to start (exit {p.wait()})")
        if busy:
            loop = subprocess.Popen([sys.executable, "-c", BUSY])
            time.sleep(0.5)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        out = []
        for p in procs:
            for line in p.stdout:
                if changes and line.startswith("answer "):
                    k = int(line.split()[1])
                    if k == answers and loop is None:          # a third done: another job starts
                        loop = subprocess.Popen([sys.executable, "-c", BUSY])
                    elif k == 2 * answers and loop is not None:  # two thirds: it ends
                        loop.kill()
                if line.startswith("seconds "):
                    out.append(float(line.split()[1]))
            p.wait()
        return out
    finally:
        if loop is not None:
            loop.kill()
        for p in procs:
            p.kill()


SCENARIOS = {"alone": dict(workers=1), "busy loop": dict(workers=1, busy=True), "two at once": dict(workers=2),
             "load changes": dict(workers=1, changes=True)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tinyllava.bench_load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", type=int, default=3, help="answers timed in each process (3)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="which, comma-separated")
    ap.add_argument("--threading-layer", choices=["workqueue", "omp", "tbb"],
                    help="numba's threading layer for the workers (default: numba's choice)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from .runtime import cores
    choices = ["auto"] + list(range(1, cores() + 1))
    report = {"cores": cores(), "load_average": os.getloadavg()[0], "answers": args.answers,
              "threading_layer": args.threading_layer or "numba's default", "results": {}}
    for name in args.scenarios.split(","):
        report["results"][name] = {str(t): run(t, answers=args.answers, layer=args.threading_layer, **SCENARIOS[name])
                                   for t in choices}
        print(f"{name}: {report['results'][name]}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(report))
        return
    base = report["results"].get("alone", {}).get("1", [None])[0]  # one thread alone on an idle machine
    print(f"{report['cores']} cores, load average {report['load_average']:.2f} before the run, {args.answers} "
          f"answers a process (3x in 'load changes'), numba's threading layer: {report['threading_layer']}; "
          f"seconds (each process's, slowest first)\n")
    print("| scenario | " + " | ".join(f"{t} thread{'s' if t != 1 else ''}" if t != "auto" else "decided (auto)"
                                      for t in choices) + " | auto / best fixed | auto / one thread alone |")
    print("| --- " * (len(choices) + 3) + "|")
    for name, res in report["results"].items():
        worst = {t: max(v) for t, v in res.items()}
        best = min(v for t, v in worst.items() if t != "auto")
        alone = base * (3 if name == "load changes" else 1) if base else None
        cells = [" / ".join(f"{s:.2f}" for s in sorted(res[str(t)], reverse=True)) for t in choices]
        print(f"| {name} | " + " | ".join(cells) + f" | {worst['auto'] / best:.2f}x | " +
              (f"{worst['auto'] / alone:.2f}x |" if alone else "- |"))


if __name__ == "__main__":
    main()
