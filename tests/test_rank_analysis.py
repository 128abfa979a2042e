import torch

from pipeline.nets import build_model
from pipeline.rank_analysis import model_ra_index, ra_maxpool_kernel, rank_analysis


def test_resnet18_at_224px_matches_the_original_rank_analysis():
    for kernel, per_image in ((3, -50176), (19, 3072)):
        model = build_model("resnet18", 3, 1000, 224, maxpool_kernel=kernel)
        for batch in (1, 8):
            units = rank_analysis(model, "resnet18", 3, 224, batch)
            assert model_ra_index(units) == per_image * batch
            assert next(u for u in units if u.unit == "maxpool").ra_index == per_image * batch
    # the maxpool unit's RA-i is 150528 - 64 s^2 for one image: positive from s = 48, kernel 19
    assert ra_maxpool_kernel("resnet18", 3, 1000, 224) == 19


def test_rule_at_the_default_input_size_gives_a_working_network_with_positive_ra():
    for arch in ("resnet18", "convnet"):
        kernel = ra_maxpool_kernel(arch, 1, 10, 32)
        model = build_model(arch, 1, 10, 32, maxpool_kernel=kernel)
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
        assert model_ra_index(rank_analysis(model, arch, 1, 32)) > 0
        smaller = build_model(arch, 1, 10, 32, maxpool_kernel=kernel - 1)
        assert model_ra_index(rank_analysis(smaller, arch, 1, 32)) <= 0  # the smallest such kernel
    assert model_ra_index(rank_analysis(build_model("convnet", 1, 10, 32), "convnet", 1, 32)) < 0
