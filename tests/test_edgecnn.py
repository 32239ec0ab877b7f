"""EdgeCNN: architecture, initialisation, ten-crop test, training, ONNX round-trip."""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T

from vlprompt.methods.edgecnn import EdgeCNN, ten_crop_logits


def test_parameter_count_and_output_shapes():
    model = EdgeCNN(num_classes=7)
    assert sum(p.numel() for p in model.parameters()) == 418_487
    for side in (44, 48):
        assert model(torch.randn(2, 3, side, side)).shape == (2, 7)
    assert EdgeCNN(num_classes=0)(torch.randn(1, 3, 44, 44)).shape == (1, 152)
    assert not any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules())


def test_initialisation_runs():
    """The release's loop never matched a module; ours sets He-normal (fan-out) convolutions."""
    torch.manual_seed(0)
    model = EdgeCNN(num_classes=7)
    conv = model.features[3].conv1  # a 3x3 conv with 4*8 = 32 output channels
    expected = math.sqrt(2.0 / (3 * 3 * conv.out_channels))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert all(torch.all(m.weight == 1) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_ten_crop_average_equals_mean_of_single_crop_logits():
    torch.manual_seed(1)
    model = EdgeCNN(num_classes=7).eval()
    faces = torch.rand(3, 3, 48, 48)
    crops = torch.stack([torch.stack(T.TenCrop(44)(face)) for face in faces])  # [3, 10, 3, 44, 44]
    with torch.no_grad():
        averaged = ten_crop_logits(model, crops)
        singles = torch.stack([torch.stack([model(crops[b, c:c + 1])[0] for c in range(10)]).mean(0)
                               for b in range(3)])
    torch.testing.assert_close(averaged, singles, atol=1e-5, rtol=1e-5)


def synthetic_faces(n_per_class=6, classes=7, seed=0):
    """48x48 'faces' whose class sets the position of a bright blob (plus noise)."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for label in range(classes):
        for _ in range(n_per_class):
            face = torch.rand(1, 48, 48, generator=generator) * 0.3
            row, col = divmod(label, 3)
            face[:, 4 + 14 * row:16 + 14 * row, 4 + 14 * col:16 + 14 * col] += 0.7
            images.append(face.expand(3, -1, -1))  # grey replicated to 3 channels
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = EdgeCNN(num_classes=7)
    images, labels = synthetic_faces()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    losses = []
    for step in range(20):
        crops = T.RandomCrop(44)(images)
        loss = F.cross_entropy(model(crops), labels)
        optimizer.zero_grad()
        loss.backward()
        for p in model.parameters():
            p.grad.clamp_(-0.1, 0.1)
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0]


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                    reason="needs onnx and onnxruntime (pip install onnx onnxruntime)")
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
def test_onnx_export_round_trips_to_the_same_logits(tmp_path):
    from benchmarks.edge_report import export_onnx, onnx_logits
    torch.manual_seed(2)
    model = EdgeCNN(num_classes=7).eval()
    with torch.no_grad():  # give BatchNorm non-trivial statistics, as a trained model has
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    path = export_onnx(model, str(tmp_path / "edgecnn.onnx"))
    images = torch.rand(5, 3, 44, 44)
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(torch.from_numpy(onnx_logits(path, images)), expected, atol=1e-4, rtol=1e-4)
