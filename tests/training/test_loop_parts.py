"""Pieces of the training loop that make DDP equal one process per global batch."""
import torch

from pccfast.training.loop import Distributed, _positions, segmentation_loss


def test_ranks_split_each_global_batch_into_its_slots():
    one = list(_positions(3, 6, 8, Distributed()))
    two = [list(_positions(3, 6, 8, Distributed(rank=r, world=2))) for r in range(2)]
    assert one[0] == list(range(24, 32))
    for it in range(3):  # rank 0 takes the first half of every global batch, rank 1 the second
        assert two[0][it] + two[1][it] == one[it]


def test_loss_over_ranks_with_the_global_pixel_count_is_the_one_process_loss():
    g = torch.Generator().manual_seed(0)
    out = {"out": torch.randn(4, 5, 6, 6, generator=g), "aux": torch.randn(4, 5, 6, 6, generator=g)}
    target = torch.randint(0, 5, (4, 6, 6), generator=g)
    target[0, :3] = 255  # ignored pixels, unevenly spread over the ranks
    target[3] = 255
    labelled = (target != 255).sum().float()
    full = segmentation_loss(out, target, 0.4, 255, labelled)
    world = 2
    per_rank = [segmentation_loss({k: v[r * 2:(r + 1) * 2] for k, v in out.items()}, target[r * 2:(r + 1) * 2], 0.4,
                                  255, labelled / world) for r in range(world)]
    assert torch.allclose(sum(per_rank) / world, full)  # DDP averages the ranks' gradients
    plain = torch.nn.functional.cross_entropy(out["out"], target, ignore_index=255)
    aux = torch.nn.functional.cross_entropy(out["aux"], target, ignore_index=255)
    assert torch.allclose(full, plain + 0.4 * aux)


def test_torchrun_two_cpu_ranks(tmp_path):
    """DDP end to end on the CPU (gloo): two ranks train, evaluate (counts summed over ranks) and rank 0 writes
    the checkpoint and log."""
    import json
    import os
    import subprocess
    import sys

    from conftest import write_planted

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    data = write_planted(str(tmp_path / "d"), range(6), size=32)
    val = write_planted(str(tmp_path / "v"), range(100, 104), size=32, split="val")
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "pccfast.train", data, "--val", val, "--out", out, "--arch", "deeplabv3_mobilenet_v3_large",
           "--backbone-weights", "none", "--iters", "3", "--batch", "4", "--crop", "32", "--eval-every", "3",
           "--log-every", "1", "--workers", "0", "--no-progress", "--device", "cpu"]
    res = subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(x) for x in f]
    assert [r["iter"] for r in log if "loss" in r] == [1, 2, 3]
    evals = [r for r in log if "val_miou" in r]
    assert len(evals) == 1
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["iteration"] == 3
    with open(os.path.join(out, "train.json")) as f:
        assert json.load(f)["world_size"] == 2
