"""Peak memory of the trainer's video reading against clip length and resolution (issue 25).

Makes test clips with imageio-ffmpeg's bundled ffmpeg (``testsrc``, H.264), then for each clip runs one
fresh process that loads one training item from it (``trainer.data.videos.VideoClips.__getitem__``: a
16-frame window at 64x64) and reports its peak resident memory (``resource.getrusage``'s ``ru_maxrss``).
A process that imports the same modules and decodes nothing gives the baseline; the table shows each
clip's Python peak and that peak above the baseline (what holding the clip's frames cost). ``--tree`` runs
that process on another checkout (e.g. the code before issue 25, for the before/after table).

The decoder runs in its own ffmpeg process, whose memory the Python peak does not include: its peak
(``os.wait4``) is measured here for both commands side by side, decoding the whole video at its stored size
(what ``engine.video_io.read_video`` runs) and decoding the last 16-frame window scaled to 64x64 (what
``engine.video_io.read_clip`` runs).

    python benchmarks/video_memory.py                    # 2 s and 15 s, 320x240 and 1920x1080, 10 fps
    python benchmarks/video_memory.py --tree ../old      # the Python side on another checkout
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: the packages live at the repo root
    sys.path.insert(0, str(ROOT))

from engine.cli import Int, Parser, run_main  # noqa: E402

CHILD = """
import resource, sys, time
from trainer.data.videos import VideoClips
path = sys.argv[1]
t0 = time.perf_counter()
if path != "-":
    clips = VideoClips([(path, "a clip")], num_frames=16, height=64, width=64, frame_stride=int(sys.argv[2]))
    item = clips[0]
    assert item is not None and tuple(item["video"].shape) == (16, 3, 64, 64), item
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t0,
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def make_clip(path: str, seconds: int, width: int, height: int, fps: int) -> None:
    """A ``testsrc`` clip (moving pattern and a frame counter), H.264 yuv420p."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", "-f", "lavfi",
           "-i", f"testsrc=size={width}x{height}:rate={fps}", "-t", str(seconds), "-c:v", "libx264",
           "-preset", "ultrafast", "-pix_fmt", "yuv420p", path]
    subprocess.run(cmd, check=True)


def peak_mib(path: str, tree: str) -> tuple:
    """(peak RSS in MiB, seconds to load the item) of a fresh process loading one item of ``path`` with the
    code of the checkout ``tree``."""
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, path, "1"], capture_output=True, text=True,
                         env=env, cwd=tree, check=True).stdout.split()
    return float(out[0]), float(out[1])


def ffmpeg_peak_mib(cmd) -> float:
    """Peak RSS in MiB of one ffmpeg run (its output discarded): its VmHWM, read every 5 ms while it runs.
    (``wait4``'s ru_maxrss would include this process's own size: a forked child counts its parent's pages
    until it execs.)"""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0.0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:  # it ended between the poll and the read
            break
        time.sleep(0.005)
    if proc.wait() != 0:
        raise RuntimeError(f"ffmpeg failed: {' '.join(cmd)}")
    return peak


def decoder_peaks(path: str, frames: int) -> tuple:
    """(ffmpeg's peak MiB decoding all of ``path`` at its stored size, decoding its last 16-frame window
    scaled to 64x64)."""
    import imageio_ffmpeg

    from engine.video_io import _PASSTHROUGH, clip_command

    whole = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-i", path, *_PASSTHROUGH,
             "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    return ffmpeg_peak_mib(whole), ffmpeg_peak_mib(clip_command(path, frames - 16, 16, 1, (64, 64)))


def main(argv=None) -> int:
    p = Parser(prog="python benchmarks/video_memory.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", default="2,15", help="clip lengths in seconds (comma-separated)")
    p.add_argument("--sizes", default="320x240,1920x1080", help="clip sizes WxH (comma-separated)")
    p.add_argument("--fps", type=Int(), default=10)
    p.add_argument("--tree", default=str(ROOT), help="checkout whose trainer loads the items (default: this one)")
    p.add_argument("--json", help="also write the rows here")

    def body() -> int:
        args = p.parse_args(argv)
        seconds = [int(s) for s in args.seconds.split(",")]
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        tree = os.path.abspath(args.tree)
        base, _ = peak_mib("-", tree)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for w, h in sizes:
                for s in seconds:
                    path = os.path.join(tmp, f"{w}x{h}-{s}s.mp4")
                    make_clip(path, s, w, h, args.fps)
                    peak, took = peak_mib(path, tree)
                    whole, clip = decoder_peaks(path, s * args.fps)
                    rows.append({"size": f"{w}x{h}", "seconds": s, "frames": s * args.fps, "peak_mib": round(peak),
                                 "above_baseline_mib": round(peak - base), "load_s": round(took, 2),
                                 "ffmpeg_whole_mib": round(whole), "ffmpeg_clip_mib": round(clip)})
                    os.remove(path)
        print(f"{tree}: baseline (imports, no decoding) {base:.0f} MiB peak RSS")
        print("| clip | frames | Python peak RSS MiB | above baseline MiB | load s | ffmpeg, whole video MiB | "
              "ffmpeg, one window MiB |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['size']}, {r['seconds']} s | {r['frames']} | {r['peak_mib']} | {r['above_baseline_mib']} | "
                  f"{r['load_s']} | {r['ffmpeg_whole_mib']} | {r['ffmpeg_clip_mib']} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"tree": tree, "baseline_mib": round(base), "fps": args.fps, "rows": rows}, f, indent=1)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
