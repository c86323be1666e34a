"""What the web app adds to a run: the same short run from the command line and from the app.

    python benchmarks/bench_app_overhead.py [recipe=fit-image-quick]
        [image=examples/toy/red-mug.png] [repeats=3] [warmup=true] [poll=2.0]
        [out=outputs/bench-app-overhead] [key=value ...]

``key=value`` items with a dot (``stages.fit.steps=50``) are overrides of every run, given to
both exactly as a user would (on the command line; one a line in the page's overrides box).

* **CLI**: ``python -m engine.run recipe=R image=I out=DIR [overrides]`` as a subprocess
  (its output to a file); the time is its wall time, process start to exit.
* **app**: ``python -m engine.app port=0 outputs=DIR`` is started once (not timed), then
  driven with gradio_client as docs/web-app.md shows: the time runs from the ``/start`` call
  (the picture uploaded, checked and kept, the run queued and started) until ``/status``
  says ``done``. The app zips the run folder just before it marks a run done, so the end
  is the zip's modification time (exact, whatever the poll); ``/status`` is called every
  ``poll`` seconds, by default every 2 s as the page's own timer refreshes it (polling
  faster costs the run CPU: at 0.2 s the app and its client took a quarter of a core).
  When the poll saw ``done`` is printed too, and the CPU seconds the app's process (Linux)
  and the client in this process used during the run.

The two alternate, ``repeats`` times each, in the order CLI, app, app, CLI, CLI, app, ...
(so a drift in the machine's load falls on both alike), after one untimed run each way
(``warmup``: file caches, the app's first request). Per try it prints the wall time and
the run's training time (metrics.jsonl's ``time`` at each stage's last step, added over
stages); then the medians, the app's extra seconds and the ratio app / CLI, with the load
average before and after.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _runs import train_seconds

ROOT = Path(__file__).resolve().parent.parent
ENDED = ("done", "cancelled", "interrupted", "failed", "unknown")


def cli_run(args, overrides, out: Path) -> dict:
    items = [f"recipe={args.recipe}", f"image={args.image}", *overrides, f"out={out}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "wb") as log:
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", "engine.run", *items], cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
        wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"the CLI run failed (exit {code}); see {out.parent / out.name}.log")
    return {"way": "CLI", "wall_s": wall, "train_s": train_seconds(out), "run_dir": str(out)}


class App:
    """``python -m engine.app port=0 outputs=DIR`` in a subprocess, and a gradio_client of
    it."""

    def __init__(self, outputs: Path, downloads: Path):
        from gradio_client import Client

        outputs.mkdir(parents=True, exist_ok=True)
        self.log_path = outputs.parent / "app.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.app", "port=0",
                                      f"outputs={outputs}"], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline, url = time.time() + 180, None
        while url is None:
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                raise SystemExit(f"the app did not start; see {self.log_path}")
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith("distill-engine web app: "):
                    url = line.split(": ", 1)[1].split()[0]
            time.sleep(0.2)
        downloads.mkdir(parents=True, exist_ok=True)
        self.client = Client(url, verbose=False, analytics_enabled=False,
                             download_files=str(downloads))
        self.url = url

    def cpu_seconds(self) -> float:
        """The app process's CPU time so far (Linux: /proc; NaN elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def run(self, args, overrides) -> dict:
        from gradio_client import handle_file

        app_cpu, client_cpu = self.cpu_seconds(), time.process_time()
        start = time.time()
        result = self.client.predict(handle_file(str(Path(args.image).resolve())), "",
                                     args.recipe, "\n".join(overrides), "",
                                     api_name="/start")
        run_id, message = result[0], result[-1]
        if not run_id:
            raise SystemExit(f"the app refused the run: {message}")
        while True:
            status = self.client.predict(run_id, api_name="/status")
            if status["state"] in ENDED:
                break
            time.sleep(args.poll)
        seen = time.time() - start
        if status["state"] != "done":
            raise SystemExit(f"the app's run {run_id} ended {status['state']}: "
                             f"{status['error']}")
        # the app zips the run folder just before it marks the run done: the zip's time is
        # when it was done, to the millisecond, whatever the poll
        zipped = Path(status["zip"]).stat().st_mtime if status.get("zip") else None
        run_dir = Path(status["run_dir"])
        return {"way": "app", "wall_s": zipped - start if zipped else seen, "seen_s": seen,
                "train_s": train_seconds(run_dir), "run_dir": str(run_dir),
                "app_cpu_s": self.cpu_seconds() - app_cpu,
                "client_cpu_s": time.process_time() - client_cpu}

    def close(self) -> None:
        if self.proc.poll() is None:
            # SIGTERM: the app stops as on Ctrl-C (SIGINT may be ignored in a background job)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def main(argv=None) -> int:
    from engine.cli import Command, Key

    args = Command("python benchmarks/bench_app_overhead.py", __doc__, [
        Key("recipe", str, "fit-image-quick"),
        Key("image", str, "examples/toy/red-mug.png"),
        Key("repeats", int, 3, help="timed runs each way"),
        Key("warmup", bool, True, help="one untimed run each way first"),
        Key("poll", float, 2.0, help="seconds between the app's /status calls (the page's "
                                     "own refresh: 2 s)"),
        Key("out", str, "outputs/bench-app-overhead"),
    ], passthrough=True).parse(sys.argv[1:] if argv is None else argv)
    overrides = list(args.rest)
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    load_before = os.getloadavg()
    app = App(out / "app", out / "downloads")
    rows = []
    try:
        if args.warmup:
            cli_run(args, overrides, out / "cli" / "warmup")
            app.run(args, overrides)
        for i in range(args.repeats):
            for way in (("CLI", "app") if i % 2 == 0 else ("app", "CLI")):
                row = (cli_run(args, overrides, out / "cli" / f"try-{i}") if way == "CLI"
                       else app.run(args, overrides))
                row["try"] = i
                rows.append(row)
                print(f"  try {i} {way:<3}: wall {row['wall_s']:6.2f} s, training "
                      f"{row['train_s']:6.2f} s"
                      + (f" (done seen by the poll after {row['seen_s']:.2f} s; CPU meanwhile:"
                         f" the app {row['app_cpu_s']:.2f} s, its client here "
                         f"{row['client_cpu_s']:.2f} s)" if row["way"] == "app" else ""),
                      flush=True)
    finally:
        app.close()
    load_after = os.getloadavg()

    def median(way: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["way"] == way)

    cli_w, app_w = median("CLI", "wall_s"), median("app", "wall_s")
    cli_t, app_t = median("CLI", "train_s"), median("app", "train_s")
    print(f"{args.recipe} on {args.image}"
          + (f" ({' '.join(overrides)})" if overrides else "")
          + f", {args.repeats} runs each way, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after:")
    print("| median | CLI | app | app - CLI | app / CLI |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| wall time (s) | {cli_w:.2f} | {app_w:.2f} | {app_w - cli_w:+.2f} | "
          f"{app_w / cli_w:.3f} |")
    print(f"| training time (s) | {cli_t:.2f} | {app_t:.2f} | {app_t - cli_t:+.2f} | "
          f"{app_t / cli_t:.3f} |")
    print(f"CPU used during an app run, median: the app's process "
          f"{median('app', 'app_cpu_s'):.2f} s, the client polling it every {args.poll:g} s "
          f"{median('app', 'client_cpu_s'):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
