"""A 2-process torchrun (gloo, CPU) training run finishes and leaves identical parameters on both ranks."""

import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from test_train_stages import tiny_config  # noqa: E402  (tests/trainer is on sys.path under pytest)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# Each rank runs the trainer's library entry point (what `python -m trainer.train` runs) and writes its own
# copy of the trained network, which rank 0 alone would never save.
WORKER = textwrap.dedent("""
    import sys
    from safetensors.torch import save_file
    from trainer.distributed import finish, init_distributed
    from trainer.train import build_parser, train

    args = build_parser().parse_args(sys.argv[1:])
    info = init_distributed("cpu")
    result = train(args, info)
    state = {k: v.detach().contiguous() for k, v in result.network.state_dict().items()}
    ema = {k: v.detach().contiguous() for k, v in result.ema.state_dict().items()}
    save_file(state, f"{args.out}/rank{info.rank}.safetensors")
    save_file(ema, f"{args.out}/rank{info.rank}-ema.safetensors")
    finish(info)  # destroy_process_group, then os._exit (DESIGN 8)
""")


def test_two_process_gloo_run_keeps_ranks_identical(tmp_path):
    config = tiny_config(tmp_path / "tiny.json")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           str(script), "--stage", "autoencoder", "--config", config, "--data", "synthetic", "--out", str(out),
           "--steps", "3", "--batch-size", "2", "--num-clips", "8", "--checkpoint-every", "3", "--log-every", "1",
           "--sample-every", "0", "--no-progress", "--threads", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for suffix in ("", "-ema"):
        a, b = load_file(out / f"rank0{suffix}.safetensors"), load_file(out / f"rank1{suffix}.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{name}{suffix} differs between ranks"
    # Rank 0 wrote the checkpoint (with both ranks' RNG states) and the model folder.
    rng = load_file(out / "checkpoints" / "autoencoder" / "step-00000003" / "rng.safetensors")
    assert {"generator.0", "generator.1"} <= set(rng)
    # Each rank's own global and loader states (a resumed rank 1 must not get rank 0's).
    for name in ("torch_cpu", "numpy", "python", "loader"):
        assert {f"{name}.0", f"{name}.1"} <= set(rng), name
    assert not torch.equal(rng["loader.0"], rng["loader.1"]), "ranks' loader generators are seeded apart"
    assert not torch.equal(rng["generator.0"], rng["generator.1"]), "ranks must draw different noise"
    assert (out / "model" / "cmd_config.json").is_file()
