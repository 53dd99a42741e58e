"""The built-in DeepLabv3 models have torchvision's parameter names and shapes, and weights load by path."""
import pytest
import torch

from pccfast.training.models import ARCHS, build_model, builtin_model, load_weights, torchvision_model

# Written from torchvision's published architecture (torchvision.models.segmentation.deeplabv3_*,
# num_classes=21, aux_loss=True): a few state_dict keys and shapes per model, and the parameter
# counts of the weights' metadata (``num_params``).
EXPECTED = {
    "deeplabv3_resnet50": (42_004_074, {
        "backbone.conv1.weight": (64, 3, 7, 7),
        "backbone.bn1.running_var": (64,),
        "backbone.layer1.0.conv1.weight": (64, 64, 1, 1),
        "backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.layer2.0.conv2.weight": (128, 128, 3, 3),
        "backbone.layer3.5.conv2.weight": (256, 256, 3, 3),
        "backbone.layer4.0.downsample.1.weight": (2048,),
        "backbone.layer4.2.conv3.weight": (2048, 512, 1, 1),
        "classifier.0.convs.0.0.weight": (256, 2048, 1, 1),
        "classifier.0.convs.1.0.weight": (256, 2048, 3, 3),
        "classifier.0.convs.3.1.running_mean": (256,),
        "classifier.0.convs.4.1.weight": (256, 2048, 1, 1),
        "classifier.0.project.0.weight": (256, 1280, 1, 1),
        "classifier.1.weight": (256, 256, 3, 3),
        "classifier.4.weight": (21, 256, 1, 1),
        "classifier.4.bias": (21,),
        "aux_classifier.0.weight": (256, 1024, 3, 3),
        "aux_classifier.4.weight": (21, 256, 1, 1),
    }),
    "deeplabv3_resnet101": (60_996_202, {
        "backbone.layer3.22.conv3.weight": (1024, 256, 1, 1),
        "backbone.layer4.2.bn3.weight": (2048,),
        "classifier.0.convs.2.0.weight": (256, 2048, 3, 3),
    }),
    "deeplabv3_mobilenet_v3_large": (11_029_328, {
        "backbone.0.0.weight": (16, 3, 3, 3),
        "backbone.0.1.weight": (16,),
        "backbone.1.block.0.0.weight": (16, 1, 3, 3),
        "backbone.2.block.0.0.weight": (64, 16, 1, 1),
        "backbone.4.block.2.fc1.weight": (24, 72, 1, 1),
        "backbone.4.block.2.fc2.bias": (72,),
        "backbone.13.block.1.0.weight": (672, 1, 5, 5),
        "backbone.15.block.3.1.running_var": (160,),
        "backbone.16.0.weight": (960, 160, 1, 1),
        "classifier.0.convs.0.0.weight": (256, 960, 1, 1),
        "classifier.4.weight": (21, 256, 1, 1),
        "aux_classifier.0.weight": (10, 40, 3, 3),
        "aux_classifier.4.weight": (21, 10, 1, 1),
    }),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_names_and_shapes_are_torchvisions(arch):
    model = builtin_model(arch, 21)
    n_params, keys = EXPECTED[arch]
    assert sum(p.numel() for p in model.parameters()) == n_params
    state = model.state_dict()
    got = {k: tuple(state[k].shape) for k in keys if k in state}
    assert got == keys
    assert not any(k.startswith(("backbone.fc.", "backbone.17.", "backbone.avgpool")) for k in state)


@pytest.mark.parametrize("arch,stride", [("deeplabv3_resnet50", 8), ("deeplabv3_mobilenet_v3_large", 16)])
def test_output_stride_and_logit_shapes(arch, stride):
    model = builtin_model(arch, 5).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.backbone(x)
        out = model(x)
    assert feats["out"].shape[-2:] == (64 // stride, 96 // stride)
    assert out["out"].shape == (2, 5, 64, 96) and out["aux"].shape == (2, 5, 64, 96)


def test_torchvision_is_used_only_where_it_imports():
    """On a machine where torchvision does not import, the choice falls back to the built-in model."""
    tv = torchvision_model("deeplabv3_mobilenet_v3_large", 21)
    model, info = build_model("deeplabv3_mobilenet_v3_large", 21, "none")
    assert info.implementation == ("built-in" if tv is None else "torchvision")
    if tv is not None:  # where torchvision works, its keys are exactly ours
        assert list(tv.state_dict()) == list(builtin_model("deeplabv3_mobilenet_v3_large", 21).state_dict())


def test_imagenet_style_backbone_file_loads_by_name(tmp_path):
    """A torchvision ImageNet classifier file (ResNet keys without prefix, plus fc.*) fills the backbone."""
    src = builtin_model("deeplabv3_resnet50", 21)
    state = {k[len("backbone."):]: v for k, v in src.state_dict().items() if k.startswith("backbone.")}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(state, path)
    model, info = build_model("deeplabv3_resnet50", 21, str(path), implementation="builtin")
    got = model.state_dict()
    assert all(torch.equal(got["backbone." + k], v) for k, v in state.items() if not k.startswith("fc."))
    assert "backbone" in info.weights


def test_mobilenet_features_and_deeplab_checkpoint_load(tmp_path):
    src = builtin_model("deeplabv3_mobilenet_v3_large", 21)
    feats = {"features." + k[len("backbone."):]: v for k, v in src.state_dict().items() if k.startswith("backbone.")}
    feats["classifier.0.weight"] = torch.randn(1280, 960)
    torch.save(feats, tmp_path / "mnv3.pth")
    model = builtin_model("deeplabv3_mobilenet_v3_large", 21)
    load_weights(model, str(tmp_path / "mnv3.pth"))
    assert torch.equal(model.state_dict()["backbone.16.0.weight"], src.state_dict()["backbone.16.0.weight"])
    # a whole DeepLabv3 checkpoint with another class count: backbone and same-shape heads load, the last layers stay
    torch.save(src.state_dict(), tmp_path / "deeplab21.pth")
    model5 = builtin_model("deeplabv3_mobilenet_v3_large", 5)
    before = model5.state_dict()["classifier.4.weight"].clone()
    note = load_weights(model5, str(tmp_path / "deeplab21.pth"))
    assert torch.equal(model5.state_dict()["classifier.1.weight"], src.state_dict()["classifier.1.weight"])
    assert torch.equal(model5.state_dict()["classifier.4.weight"], before)
    assert "another shape" in note


def test_weights_of_another_architecture_are_one_line(tmp_path):
    torch.save(builtin_model("deeplabv3_mobilenet_v3_large", 21).state_dict(), tmp_path / "mnv3.pth")
    with pytest.raises(ValueError, match=r"does not fit this architecture: backbone\.conv1\.weight is missing"):
        build_model("deeplabv3_resnet50", 21, str(tmp_path / "mnv3.pth"), implementation="builtin")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable torch weights file"):
        build_model("deeplabv3_mobilenet_v3_large", 21, str(tmp_path / "junk.pth"), implementation="builtin")
    with pytest.raises(ValueError, match="no such file"):
        build_model("deeplabv3_mobilenet_v3_large", 21, str(tmp_path / "absent.pth"), implementation="builtin")


def test_auto_weights_without_torchvision_say_what_to_pass():
    if torchvision_model("deeplabv3_mobilenet_v3_large", 21) is not None:
        pytest.skip("torchvision imports here")
    with pytest.raises(ValueError, match="--backbone-weights PATH.*--backbone-weights none"):
        build_model("deeplabv3_mobilenet_v3_large", 21, "auto")


def test_bad_arch_and_classes():
    with pytest.raises(ValueError, match="`arch` has to be one of .* but is 'resnet18'"):
        builtin_model("resnet18", 21)
    with pytest.raises(ValueError, match="`num_classes` has to be an int of at least 2 but is 1"):
        builtin_model("deeplabv3_resnet50", 1)
