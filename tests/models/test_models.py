import pytest
import torch
from torch.func import functional_call, grad, vmap

from spfl_vmap.errors import ConfigError
from spfl_vmap.models import MODELS, check_model_input, create_model, num_params


def test_fedavg_cnn_parameter_count():
    # McMahan et al. 2017's CNN on 28x28x1: 1,663,370 parameters (DESIGN.md references)
    assert num_params(create_model("cnn", (1, 28, 28), 10)) == 1_663_370


def test_resnet20_size():
    # He et al. 2016: ResNet-20 for CIFAR has 0.27M parameters
    assert 0.26e6 < num_params(create_model("resnet20", (3, 32, 32), 10)) < 0.28e6


@pytest.mark.parametrize("name", ["lr", "cnn", "cnn_cifar", "convnet", "resnet20"])
def test_models_are_vmap_safe(name):
    shape = (1, 28, 28) if name in ("lr", "cnn") else (3, 32, 32)
    m = create_model(name, shape, 10, width=8)
    assert not list(m.buffers())
    params = {k: v.detach()[None].expand(2, *v.shape).clone() for k, v in m.named_parameters()}
    x = torch.randn(2, 3, *shape)
    loss = lambda p, xb: functional_call(m, p, (xb,)).square().mean()  # noqa: E731
    g = vmap(grad(loss))(params, x)
    g0 = grad(loss)({k: v[0] for k, v in params.items()}, x[0])
    for k in g0:
        assert torch.allclose(g[k][0], g0[k], rtol=1e-4, atol=1e-6)


def test_small_inputs_are_rejected():
    with pytest.raises(ConfigError, match="at least 9x9"):
        check_model_input("convnet", (1, 8, 8), "digits")
    check_model_input("cnn", (1, 8, 8), "digits")
    assert set(MODELS.names()) >= {"lr", "cnn", "cnn_cifar", "convnet", "resnet20", "resnet56"}
