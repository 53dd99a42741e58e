"""The command-line helpers every command shares (pccfast.cli.common)."""
import argparse

import pytest
import torch

from pccfast.cli import common as cli_common
from pccfast.cli.common import (
    CONFIG_HELP,
    add_config_arguments,
    add_device_arguments,
    add_label_set_argument,
    config_from_args,
    device_from_args,
    fail,
    label_set_from_args,
)
from pccfast.core.config import PCCConfig
from pccfast.data.labelsets import get_label_set


# ------------------------------------------------------------------------------------------
# cli_common
# ------------------------------------------------------------------------------------------
def _parser():
    p = argparse.ArgumentParser(prog="t")
    add_config_arguments(p)
    add_device_arguments(p)
    add_label_set_argument(p)
    return p


def test_config_arguments():
    p = _parser()
    assert config_from_args(p.parse_args([])) == PCCConfig()
    args = p.parse_args(["--cluster-ks", "4, 5", "--thresholds", "0.25,0.5", "--no-refine", "--kmeans-tol", "1e-3",
                         "--pca-method", "eigh", "--refine-k", "7"])
    cfg = config_from_args(args)
    assert cfg == PCCConfig(cluster_ks=(4, 5), thresholds=(0.25, 0.5), refine=False, kmeans_tol=1e-3,
                            pca_method="eigh", refine_k=7)
    assert config_from_args(p.parse_args(["--refine"]), PCCConfig(refine=False)).refine is True
    assert config_from_args(p.parse_args([]), PCCConfig(refine_k=3)).refine_k == 3
    with pytest.raises(ValueError, match=r"`connectivity` has to be 4 or 8 but is 6"):
        config_from_args(p.parse_args(["--connectivity", "6"]))
    assert set(CONFIG_HELP) == set(PCCConfig.field_names())  # every field explained, no stale entries


@pytest.mark.parametrize("argv, msg", [
    (["--cluster-ks", "4,x"], "argument --cluster-ks: has to be comma-separated ints (e.g. 4,7,10) but is '4,x'"),
    (["--cluster-ks", ","], "argument --cluster-ks: has to be comma-separated ints"),
    (["--kmeans-tol", "small"], "argument --kmeans-tol: has to be a number but is 'small'"),
    (["--refine-k", "2.5"], "argument --refine-k: has to be an int but is '2.5'"),
])
def test_config_arguments_exception(argv, msg, capsys):
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(argv)
    assert info.value.code == 2 and msg in capsys.readouterr().err


def test_device_and_label_set(tmp_path):
    p = _parser()
    assert device_from_args(p.parse_args(["--device", "cpu"])) == torch.device("cpu")
    assert device_from_args(p.parse_args([])).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cli_common.dtype_from_args(p.parse_args(["--dtype", "bfloat16"])) is torch.bfloat16
    with pytest.raises(ValueError, match=r"`--device` has to be a torch device such as cpu, cuda or cuda:1 but is 'gpu0'"):
        device_from_args(p.parse_args(["--device", "gpu0"]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"`--device` is 'cuda' but CUDA is not available here"):
            device_from_args(p.parse_args(["--device", "cuda"]))
    assert label_set_from_args(p.parse_args([])) == get_label_set("voc")
    assert label_set_from_args(p.parse_args(["--label-set", "coco"])).num_classes == 81
    with pytest.raises(ValueError, match=r"`label_set` has to be one of voc, coco"):
        label_set_from_args(p.parse_args(["--label-set", "vocc"]))
    with pytest.raises(ValueError, match=r"`label_set` has to be one of voc, coco or an existing JSON/YAML file"):
        label_set_from_args(p.parse_args(["--label-set", str(tmp_path)]))


def test_fail(capsys):
    with pytest.raises(SystemExit) as info:
        fail("first\n  second\n")
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: first; second\n"
