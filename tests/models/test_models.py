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


def seeded_model(name: str, shape: tuple[int, int, int], g: torch.Generator) -> torch.nn.Module:
    """``create_model(name, ...)`` with parameters drawn from ``g``, never from the global RNG.

    The model is built on the meta device (its constructors draw nothing), then every parameter
    is set as PyTorch's defaults would: conv/linear weights and biases ~ U(-1/sqrt(fan_in),
    1/sqrt(fan_in)), GroupNorm's affine parameters 1 and 0.
    """
    with torch.device("meta"):
        m = create_model(name, shape, 10, width=8)
    m = m.to_empty(device="cpu")
    done: set[int] = set()
    with torch.no_grad():
        for mod in m.modules():
            w, b = mod._parameters.get("weight"), mod._parameters.get("bias")
            if w is not None and w.dim() >= 2:
                bound = w[0].numel() ** -0.5
                w.uniform_(-bound, bound, generator=g)
                if b is not None:
                    b.uniform_(-bound, bound, generator=g)
            elif w is not None:
                w.fill_(1.0)
                if b is not None:
                    b.zero_()
            done |= {id(p) for p in (w, b) if p is not None}
    assert all(id(p) in done for p in m.parameters())  # nothing left uninitialised
    return m


@pytest.mark.parametrize("name", ["lr", "cnn", "cnn_cifar", "convnet", "resnet20"])
def test_models_are_vmap_safe(name):
    shape = (1, 28, 28) if name in ("lr", "cnn") else (3, 32, 32)
    g = torch.Generator().manual_seed(0)  # fixed inputs: ReLU / max-pool near-ties cannot vary
    m = seeded_model(name, shape, g)
    assert not list(m.buffers())
    params = {k: v.detach()[None].expand(2, *v.shape).clone() for k, v in m.named_parameters()}
    x = torch.randn(2, 3, *shape, generator=g)
    loss = lambda p, xb: functional_call(m, p, (xb,)).square().mean()  # noqa: E731
    gv = vmap(grad(loss))(params, x)
    g0 = grad(loss)({k: v[0] for k, v in params.items()}, x[0])
    # vmap turns the two clients' convolutions into one grouped convolution, which sums in a
    # different order than the unbatched call, so the gradients agree to fp32 rounding only. A
    # K-term fp32 sum is off by up to ~K*eps (typically ~sqrt(K)*eps) of its terms' magnitude, not
    # of the result, so entries that cancel to near zero have no useful relative accuracy: the
    # absolute tolerance is relative to the largest gradient entry. The largest reductions here
    # (conv weight gradients over 3*32*32 positions) differ by 10-20 eps of that scale across
    # seeds, so 1e3*eps leaves a wide margin; rtol adds the same slack for large entries.
    eps = torch.finfo(torch.float32).eps
    scale = max(float(v.abs().max()) for v in g0.values())
    for k in g0:
        torch.testing.assert_close(gv[k][0], g0[k], rtol=1e3 * eps, atol=1e3 * eps * scale)


def test_small_inputs_are_rejected():
    with pytest.raises(ConfigError, match="at least 9x9"):
        check_model_input("convnet", (1, 8, 8), "digits")
    check_model_input("cnn", (1, 8, 8), "digits")
    assert set(MODELS.names()) >= {"lr", "cnn", "cnn_cifar", "convnet", "resnet20", "resnet56"}
