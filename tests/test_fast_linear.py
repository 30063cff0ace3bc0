"""oneDNN linear layers (models/fast_linear.py): same products, modules restored."""

import pytest
import torch

from creative_sparse.models import fast_linear
from creative_sparse.models.fast_linear import fast_linears, onednn_linear_available

pytestmark = pytest.mark.skipif(not onednn_linear_available(),
                                reason="oneDNN linear is not available in this PyTorch build")


@pytest.fixture(autouse=True)
def routed_whatever_the_timing(monkeypatch):
    """The mechanism is tested on any CPU: routing is forced on, not timed."""
    monkeypatch.setenv("CREATIVE_SPARSE_FAST_LINEAR", "1")
    fast_linear._routing_pays.cache_clear()
    yield
    fast_linear._routing_pays.cache_clear()


def test_routing_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("CREATIVE_SPARSE_FAST_LINEAR", "0")
    fast_linear._routing_pays.cache_clear()
    layer = torch.nn.Linear(8, 4)
    with fast_linears(layer) as routed:
        assert routed == 0 and "forward" not in vars(layer)


@torch.no_grad()
@pytest.mark.parametrize("shape", [(1, 40), (3, 40), (2, 5, 40), (300, 40)])
@pytest.mark.parametrize("bias", [True, False])
def test_same_product_as_f_linear(shape, bias):
    layer = torch.nn.Linear(40, 24, bias=bias)
    x = torch.randn(*shape)
    with fast_linears(layer) as routed:
        got = layer(x)
    assert routed == 1
    torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.weight, layer.bias),
                               rtol=1e-5, atol=1e-5)


def test_modules_are_restored_even_after_an_exception():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(RuntimeError, match="boom"):
        with fast_linears(model) as routed:
            assert routed == 2 and "forward" in vars(model[0])
            raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in model.modules())


def test_layers_that_own_their_forward_are_left_alone():
    class Scaled(torch.nn.Linear):
        pass

    hooked = torch.nn.Linear(8, 8)
    hooked.register_forward_hook(lambda *_: None)
    half = torch.nn.Linear(8, 8).to(torch.bfloat16)
    model = torch.nn.ModuleList([Scaled(8, 8), hooked, half, torch.nn.Linear(8, 8)])
    with fast_linears(model) as routed:
        assert routed == 1
        assert "forward" in vars(model[3])


def test_gradients_take_the_usual_path():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with fast_linears(layer):
        layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


@torch.no_grad()
def test_a_whole_model_gives_the_same_logits():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(1))
    expected = model(ids).logits
    with fast_linears(model) as routed:
        got = model(ids).logits
    assert routed == 2 * 7 + 1                  # q, k, v, o, gate, up, down per layer + head
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
