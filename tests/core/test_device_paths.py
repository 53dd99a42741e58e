"""The accelerator code paths, run on the CPU (``pccfast.core.checks.device_code_paths``).

Where no GPU is at hand these branches (the E-step in one block, ``min`` instead of the CPU
argmin, no compaction in connected components, no kept random numbers) would otherwise never
run. They have to give the CPU paths' results, and the op counter has to see them.
"""
import torch

from pccfast.core import checks
from pccfast.core.config import PCCConfig
from pccfast.core.kmeans import kmeans
from pccfast.core.labeller import label_images
from pccfast.testing.counting import OpCounter
from pccfast.testing.synthetic import make_scene, scene_features, stack_scenes

TORCH = PCCConfig().replace(kmeans_backend="torch", components_backend="torch", cleanup_backend="torch")


def _scenes(seeds, size=128):
    st = stack_scenes([make_scene(s, grid=size // 8, image_size=size) for s in seeds])
    return scene_features(st["layers"], size // 8), st["class_attention"], st["images"]


def test_cpu_tuned_follows_the_switch():
    assert checks.cpu_tuned("cpu") and not checks.cpu_tuned("meta")
    with checks.device_code_paths():
        assert not checks.cpu_tuned("cpu")
        with checks.device_code_paths():
            pass
        assert not checks.cpu_tuned("cpu")  # nested exit restores the outer state
    assert checks.cpu_tuned("cpu")


def test_device_paths_give_the_cpu_paths_masks():
    feats, cls, images = _scenes([0, 1, 2])
    cpu = label_images(feats, cls, images, TORCH)
    with checks.device_code_paths():
        dev = label_images(feats, cls, images, TORCH)
    assert torch.equal(cpu.mask, dev.mask)
    assert torch.equal(cpu.blocky_full, dev.blocky_full)


def test_device_paths_kmeans_equals_cpu_kmeans_with_chunked_e_step():
    """Enough points that the CPU E-step runs in several chunks; the device path takes one block."""
    x = torch.randn(3, 60_000, 5, generator=torch.Generator().manual_seed(3))
    a, ca = kmeans(x, 20, backend="torch", seed=1)
    with checks.device_code_paths():
        b, cb = kmeans(x, 20, backend="torch", seed=1)
    assert torch.equal(a, b) and torch.equal(ca, cb)


def test_the_counter_counts_launches_without_views():
    x = torch.randn(4, 6)
    with OpCounter() as c:
        y = x.view(6, 4).t().unsqueeze(0).expand(2, 4, 6)  # views only
    assert c.total_ops == 4 and c.total_launches == 0
    with OpCounter() as c:
        (y + 1).sum()
    assert c.total_ops == 2 and c.total_launches == 2
