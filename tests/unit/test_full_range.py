"""The full-range symmetric grid: the signed-scale search against a float64
reference, the grid it reaches, and its llm-compressor observer."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, fake_quantize
from llmcompressor.observers import Observer

from qep_modifier.full_range import FULL_RANGE_OBSERVER, full_range_scales


def _reference_scales(groups, bits, maxshrink=0.2, grid=100.0, norm=2.4):
    """One group at a time, in float64, every candidate written out."""
    lowest, highest = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scales = []
    for group in groups.double().reshape(-1, groups.shape[-1]):
        extreme = group[group.abs().argmax()]
        best = (float("inf"), None)
        for step in range(int(maxshrink * grid)):
            for sign in (1.0, -1.0):
                scale = sign * (1 - step / grid) * extreme / lowest
                error = ((torch.clamp(torch.round(group / scale), lowest, highest) * scale - group).abs() ** norm).sum()
                if error < best[0]:
                    best = (error.item(), scale)
        scales.append(best[1])
    return torch.stack(scales).reshape(groups.shape[:-1])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_scales_match_the_float64_reference(bits):
    groups = torch.randn(6, 5, 32, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    scales = full_range_scales(groups, bits)
    torch.testing.assert_close(scales, _reference_scales(groups, bits), rtol=0, atol=0)
    assert (scales < 0).any() and (scales > 0).any()


def test_the_extreme_weight_lands_on_the_extra_negative_level():
    # groups that lie on a full-range 3-bit grid: levels -4..3, the largest magnitude
    # at -4 and of either sign (a negative scale turns -4 into the largest positive)
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-3, 4, (8, 16), generator=generator).double()
    codes[:, 0] = -4
    true_scales = torch.rand(8, 1, generator=generator, dtype=torch.float64) + 0.5
    true_scales[::2] *= -1
    groups = codes * true_scales
    scales = full_range_scales(groups, 3)
    torch.testing.assert_close(scales, true_scales[:, 0], rtol=1e-12, atol=0)
    assert torch.equal(torch.round(groups / scales[:, None]), codes)
    # compressed-tensors' symmetric grid (max / 3.5) cannot hold both ends of such a group
    plain = groups.abs().amax(-1, keepdim=True) / 3.5
    assert (torch.clamp(torch.round(groups / plain), -4, 3) * plain - groups).abs().amax() > 0.1


def test_a_zero_group_keeps_a_finite_scale():
    scales = full_range_scales(torch.zeros(2, 8), 3)
    assert torch.isfinite(scales).all() and (scales != 0).all()


def _args(bits=3, symmetric=True, **fields):
    return QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=16,
        observer=FULL_RANGE_OBSERVER, **fields,
    )


def test_the_observer_gives_signed_scales_and_zero_points_of_the_plain_grid():
    import qep_modifier  # noqa: F401  (registers the observer)

    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    args = _args()
    observer = Observer.load_from_registry(FULL_RANGE_OBSERVER, base_name="weight", args=args)
    qparams = observer(weight).get_qparams()
    expected = full_range_scales(weight.reshape(8, 4, 16), 3)
    assert torch.equal(qparams["scale"], expected) and qparams["global_scale"] is None
    plain = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=_args())
    plain_zero = plain(weight).get_qparams()["zero_point"]
    assert qparams["zero_point"].shape == plain_zero.shape and qparams["zero_point"].dtype == plain_zero.dtype
    assert not qparams["zero_point"].any()
    # compressed-tensors' own fake quantization decodes the signed grid: codes -4..3
    quantized = fake_quantize(weight, qparams["scale"], qparams["zero_point"], args)
    codes = quantized.reshape(8, 4, 16) / qparams["scale"][..., None]
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-5)
    assert codes.round().min() == -4 and codes.round().max() <= 3
    assert not observer.has_statistics  # statistics deleted, as the toolkit's observers do


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(symmetric=False), "symmetric False"),
        (dict(type="float", num_bits=8), "type float"),
    ],
    ids=["asymmetric", "float"],
)
def test_the_observer_refuses_other_grids_in_one_line(fields, words):
    import qep_modifier  # noqa: F401

    args = QuantizationArgs(strategy="channel", observer=FULL_RANGE_OBSERVER, **{"num_bits": 3, "type": "int", **fields})
    with pytest.raises(ValueError) as refused:
        Observer.load_from_registry(FULL_RANGE_OBSERVER, base_name="weight", args=args)
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"observer {FULL_RANGE_OBSERVER} is for symmetric int weights") and words in message


def test_the_observer_searches_as_far_as_observer_kwargs_maxshrink_says():
    # w2a16_spinquant_qep sets maxshrink 0.6: at 2 bits a group with one outlier is
    # best clipped further than the default search (down to 0.8x) reaches
    import qep_modifier  # noqa: F401  (registers the observer)

    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(8, 64, generator=generator)
    weight[:, ::16] *= 6  # one outlier per group of 16
    default = Observer.load_from_registry(FULL_RANGE_OBSERVER, base_name="weight", args=_args(bits=2))
    wide = Observer.load_from_registry(
        FULL_RANGE_OBSERVER, base_name="weight", args=_args(bits=2, observer_kwargs={"maxshrink": 0.6})
    )
    default_scales = default(weight).get_qparams()["scale"]
    wide_scales = wide(weight).get_qparams()["scale"]
    assert torch.equal(default_scales, full_range_scales(weight.reshape(8, 4, 16), 2))
    assert torch.equal(wide_scales, full_range_scales(weight.reshape(8, 4, 16), 2, maxshrink=0.6))
    # some groups' best shrink lies beyond the default's reach (0.8x)
    assert (wide_scales != default_scales).any()
