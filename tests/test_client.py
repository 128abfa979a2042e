import pytest
import torch
from torch.nn import functional as F

from pipeline.client import batch_gradient, check_batchnorm_batch, choose_batch
from pipeline.errors import PipelineError
from pipeline.nets import build_model


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_upload_equals_autograd_of_the_batch_loss(mode):
    model = build_model("convnet", 1, 10, 32)
    images, labels = torch.randn(6, 1, 32, 32), torch.randint(0, 10, (6,))
    upload = batch_gradient(model, images, labels, mode)
    # by hand: mean of per-sample losses through a model in the same mode
    model.train(mode == "train")
    losses = F.cross_entropy(model(images), labels, reduction="none")
    expected = torch.autograd.grad(losses.mean(), list(model.parameters()))
    for (name, got), want in zip(upload.items(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)


def test_batchnorm_running_statistics_untouched_by_train_mode_upload():
    model = build_model("convnet", 1, 10, 32)
    before = model.features[1].running_mean.clone()
    batch_gradient(model, torch.randn(4, 1, 32, 32), torch.zeros(4, dtype=torch.long), "train")
    assert torch.equal(model.features[1].running_mean, before)


def test_train_mode_batch_of_one_on_resnet18_at_32px_is_refused():
    model = build_model("resnet18", 1, 10, 32)
    with pytest.raises(PipelineError, match="one value per channel at 32 px"):
        check_batchnorm_batch(model, 1, "train", 1, 32)
    check_batchnorm_batch(model, 2, "train", 1, 32)
    check_batchnorm_batch(model, 1, "eval", 1, 32)
    check_batchnorm_batch(model, 1, "train", 1, 64)


def test_batch_choice_is_seeded_and_bounded():
    assert torch.equal(choose_batch(40, 8, 3), choose_batch(40, 8, 3))
    assert len(set(choose_batch(40, 8, 3).tolist())) == 8
    with pytest.raises(PipelineError, match="victim pool holds 4"):
        choose_batch(4, 8, 0)
