"""Table 9 quantities on shape-only models (no initialisation needed)."""

from flax import nnx

from wdam_jax.complexity import count_params, xla_flops
from wdam_jax.models.wide_resnet import WideResNet50_2

TORCHVISION_WRN50_2_PARAMS = 68_883_240  # torchvision's documented num_params
TORCHVISION_WRN50_2_GMACS = 11.40  # torchvision's documented GFLOPS (multiply-adds) at 224


def _abstract(wdam_layers=()):
    return nnx.eval_shape(lambda: WideResNet50_2(wdam_layers=wdam_layers, rngs=nnx.Rngs(0)))


def test_params_match_torchvision_and_wdam_adds_its_mlps():
    plain, star = count_params(_abstract()), count_params(_abstract((1,)))
    assert plain == TORCHVISION_WRN50_2_PARAMS
    # Three Bottleneck* in layer1, C = 256: Linear(1024 -> 64) + Linear(64 -> 4), with biases.
    assert star - plain == 3 * ((1024 * 64 + 64) + (64 * 4 + 4))


def test_xla_flops_near_torchvision_figure_and_grow_with_wdam():
    plain = xla_flops(_abstract(), (1, 224, 224, 3))
    assert abs(plain / 2e9 - TORCHVISION_WRN50_2_GMACS) / TORCHVISION_WRN50_2_GMACS < 0.1
    assert plain < xla_flops(_abstract((1,)), (1, 224, 224, 3)) < 1.02 * plain
