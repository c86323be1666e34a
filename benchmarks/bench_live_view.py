"""What the live view costs a run: the same short run with output.live_view off and on.

    python benchmarks/bench_live_view.py [recipe=isotropic3d-toy]
        [image=examples/toy/red-mug.png] [steps=80] [dmtet_steps=20] [repeats=3]
        [refresh=1.0] [size=128] [out=outputs/bench-live-view]

Each run is its own ``python -m engine.run`` process (export off, progress renders off,
otherwise the recipe as it is), ``repeats`` times with the live view off and ``repeats``
times on, alternating. With it on, a client connects to the run's viser server from this
process with viser's own websocket protocol (engine.live_view.ProtocolClient: what a browser
sends and receives, without a browser, which this machine cannot run) and keeps a camera
there, so frames are rendered and sent at the refresh, as for a person watching. The time
compared is the training time (metrics.jsonl's ``time`` at each stage's last step, added
over stages: model loading and process start are left out); the medians and their ratio
are printed, with the frames the client received.
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from _runs import train_seconds

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _watch(port: int, stop: threading.Event, result: dict) -> None:
    """Connect as a browser would once the run's server is up, look from a fixed camera."""
    from engine.live_view import ProtocolClient, look_at_wxyz

    try:
        client = ProtocolClient(f"http://127.0.0.1:{port}", timeout=300.0)
    except OSError as exc:
        result["error"] = str(exc)
        return
    pose = (1.8, -1.6, 1.0)
    for _ in range(3):       # the server moves a new browser to its start view: answer it
        client.send_camera(look_at_wxyz(pose), pose, math.radians(40.0))
        time.sleep(0.2)
    stop.wait()
    result["frames"] = len(client.images)
    result["size"] = client.images[-1].shape[:2] if client.images else None
    client.close()


def one_run(args, live: bool, index: int) -> dict:
    out = Path(args.out) / f"{'on' if live else 'off'}-{index}"
    items = [f"recipe={args.recipe}", f"image={args.image}", f"out={out}",
             "export=null", "output.render_every=0", "output.progress=false",
             "output.checkpoint_every=0", "output.tensorboard=false"]
    from engine import config

    stages = list(config.compose(args.recipe, []).stages)
    items.append(f"stages.{stages[0]}.steps={args.steps}")
    for s in stages[1:]:
        items.append(f"stages.{s}.steps={args.dmtet_steps}")
    watcher, stop, seen = None, threading.Event(), {}
    if live:
        port = _free_port()
        items += ["output.live_view=true", f"output.live_view_port={port}",
                  f"output.live_view_refresh={args.refresh}", f"output.live_view_size={args.size}"]
        watcher = threading.Thread(target=_watch, args=(port, stop, seen), daemon=True)
        watcher.start()
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "engine.run", *items], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.time() - start
    stop.set()
    if watcher is not None:
        watcher.join(timeout=10)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    # the run's own count: "live view: N frames sent, X s spent rendering them"
    spent = [line.split() for line in proc.stdout.splitlines() if " frames sent, " in line]
    return {"live": live, "train_s": train_seconds(out), "wall_s": wall,
            "sent": int(spent[-1][2]) if spent else 0,
            "render_s": float(spent[-1][5]) if spent else 0.0,
            "frames": seen.get("frames"), "frame_size": seen.get("size"), "out": str(out)}


def main(argv=None) -> int:
    from engine.cli import Command, Key

    args = Command("python benchmarks/bench_live_view.py", __doc__, [
        Key("recipe", str, "isotropic3d-toy"),
        Key("image", str, "examples/toy/red-mug.png"),
        Key("steps", int, 80, help="steps of the first stage"),
        Key("dmtet_steps", int, 20, help="steps of every later stage"),
        Key("repeats", int, 3),
        Key("refresh", float, 1.0, help="output.live_view_refresh (the default: 1.0 s)"),
        Key("size", int, 128, help="output.live_view_size (the default: 128)"),
        Key("out", str, "outputs/bench-live-view"),
    ]).parse(sys.argv[1:] if argv is None else argv)
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    rows = []
    for i in range(args.repeats):
        for live in ((False, True) if i % 2 == 0 else (True, False)):
            row = one_run(args, live, i)
            rows.append(row)
            print(f"  live view {'on ' if row['live'] else 'off'} run {i}: train "
                  f"{row['train_s']:.1f} s, wall {row['wall_s']:.1f} s"
                  + (f", {row['sent']} frames sent ({row['render_s']:.1f} s rendering, "
                     f"{100 * row['render_s'] / row['train_s']:.1f}% of training), "
                     f"{row['frames']} of {row['frame_size']} px received"
                     if row["live"] else ""), flush=True)
    off = statistics.median(r["train_s"] for r in rows if not r["live"])
    on = statistics.median(r["train_s"] for r in rows if r["live"])
    off_w = statistics.median(r["wall_s"] for r in rows if not r["live"])
    on_w = statistics.median(r["wall_s"] for r in rows if r["live"])
    print(f"{args.recipe}, {args.steps}+{args.dmtet_steps} steps, refresh {args.refresh} s, "
          f"{args.size} px, {args.repeats} runs each (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}):")
    print(f"  training time, median: off {off:.2f} s, on {on:.2f} s, ratio on/off {on / off:.3f}")
    print(f"  wall time,     median: off {off_w:.2f} s, on {on_w:.2f} s, ratio on/off "
          f"{on_w / off_w:.3f}")
    share = statistics.median(r["render_s"] / r["train_s"] for r in rows if r["live"])
    sent = statistics.median(r["sent"] for r in rows if r["live"])
    print(f"  rendering the frames, median: {100 * share:.1f}% of the training time "
          f"({sent:g} frames a run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
