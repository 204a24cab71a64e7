"""Block tuning's pure pieces against float64 references (no models)."""

import math

import pytest
import torch

from qep_modifier.block_tuning import (
    OffGrid, TuningSteps, checked_batches, checked_tuning, column_groups, dequantized_weight, grid_codes, keeps_tuning,
    latent_codes, linear_decay, mean_loss, rounded_codes, tune,
)


def _grid(rows=6, columns=32, groups=4, bits=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, columns), generator=generator).to(torch.float64)
    scale = torch.rand(rows, groups, generator=generator, dtype=torch.float64) + 0.1
    zero_point = torch.randint(0, 2**bits, (rows, groups), generator=generator).to(torch.int8)
    return codes, scale, zero_point


def test_column_groups_for_group_channel_and_g_idx():
    assert torch.equal(column_groups(8, torch.ones(3, 2)), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    assert torch.equal(column_groups(5, torch.ones(3, 1)), torch.zeros(5, dtype=torch.long))
    g_idx = torch.tensor([1, 0, 1, 0], dtype=torch.int32)
    assert torch.equal(column_groups(4, torch.ones(3, 2), g_idx), g_idx.long())
    with pytest.raises(OffGrid, match="do not split"):
        column_groups(7, torch.ones(3, 2))


@pytest.mark.parametrize("permuted", [False, True], ids=["contiguous", "g_idx"])
def test_codes_and_weight_round_trip_against_float64(permuted):
    codes, scale, zero_point = _grid()
    groups = torch.arange(32) // 8
    if permuted:
        groups = groups[torch.randperm(32, generator=torch.Generator().manual_seed(1))]
    # float64 reference: each element by hand
    reference = torch.empty(6, 32, dtype=torch.float64)
    for row in range(6):
        for column in range(32):
            group = groups[column]
            reference[row, column] = (codes[row, column] - float(zero_point[row, group])) * scale[row, group]
    weight = dequantized_weight(codes, scale, zero_point, groups)
    assert torch.equal(weight, reference)
    recovered = grid_codes(weight.to(torch.float32), scale.to(torch.float32), zero_point, groups)
    assert torch.equal(recovered, codes.to(torch.float32))


def test_grid_codes_refuse_a_weight_off_its_grid():
    codes, scale, zero_point = _grid()
    groups = torch.arange(32) // 8
    weight = dequantized_weight(codes, scale, zero_point, groups)
    weight[2, 5] += 0.4 * scale[2, 0]
    with pytest.raises(OffGrid, match="0.400 of a step"):
        grid_codes(weight, scale, zero_point, groups)


def test_dequantized_weight_passes_gradients_to_the_scales_only():
    codes, scale, zero_point = _grid()
    groups = torch.arange(32) // 8
    scale = scale.clone().requires_grad_(True)
    with torch.enable_grad():  # other tests may leave grad mode off
        dequantized_weight(codes, scale, zero_point, groups).sum().backward()
    # d/ds_rg of sum over the group's columns of (c - z) * s = sum (c - z)
    expected = torch.stack(
        [(codes[:, groups == g] - zero_point[:, g : g + 1].double()).sum(dim=1) for g in range(4)], dim=1
    )
    assert torch.allclose(scale.grad, expected)


def test_tune_reaches_the_closed_form_best_channel_scales():
    """One channel-scaled Linear: the output error is quadratic in each row's
    scale, with the float64 least-squares optimum s* = <A x, y> / ||A x||^2
    (A = codes - zero point). Adam on log-gains reaches it."""
    generator = torch.Generator().manual_seed(0)
    codes, scale, zero_point = _grid(rows=4, columns=16, groups=1)
    groups = column_groups(16, scale)
    inputs = [torch.randn(32, 16, generator=generator, dtype=torch.float64) for _ in range(4)]
    centred = codes - zero_point.double()
    # a weight near the grid at 1.3x its scales, plus what no scale can reach
    true_weight = centred * 1.3 * scale + 0.1 * torch.randn(4, 16, generator=generator, dtype=torch.float64)
    targets = [x @ true_weight.T for x in inputs]
    x_all, y_all = torch.cat(inputs), torch.cat(targets)
    projected = x_all @ centred.T  # tokens x rows: A x per row
    best = (projected * y_all).sum(0) / (projected * projected).sum(0)
    assert (best > 1.1 * scale[:, 0]).all()  # far from where tuning starts

    gain = torch.zeros_like(scale, requires_grad=True)

    def batch_losses():
        for x, y in zip(inputs, targets):
            weight = dequantized_weight(codes, scale * gain.exp(), zero_point, groups)
            yield (x @ weight.T - y).pow(2).mean()

    history = tune([gain], batch_losses, epochs=300, learning_rate=0.02)
    assert len(history) == 300 and history[-1] < history[0]
    tuned = (scale * gain.exp()).detach()[:, 0]
    assert torch.allclose(tuned, best, rtol=1e-3), (tuned, best)


def test_tune_steps_under_no_grad():
    gain = torch.zeros(3, requires_grad=True)
    with torch.no_grad():
        history = tune([gain], lambda: [(gain - 1).pow(2).sum()], epochs=2, learning_rate=0.1)
    assert len(history) == 2 and (gain > 0).all()


def test_tune_takes_another_process_step_from_share():
    """Two 'processes' of one batch each: on the first, the second batch's loss
    is None and ``share`` hands over its gradients (as share_step does); the
    parameters end bit for bit where one process ends on both batches."""
    targets = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 0.7, -1.0])]

    def run(split: bool):
        gain = torch.zeros(3, requires_grad=True)

        def batch_losses():
            yield (gain - targets[0]).pow(2).sum()
            yield None if split else (gain - targets[1]).pow(2).sum()

        def share(parameters, loss):
            if loss is not None:
                return loss.item()
            with torch.enable_grad():  # what the other process computed and sent
                other = gain.detach().clone().requires_grad_(True)
                value = (other - targets[1]).pow(2).sum()
                value.backward()
            parameters[0].grad = other.grad
            return value.item()

        history = tune([gain], batch_losses, epochs=3, learning_rate=0.1, share=share if split else None)
        return gain.detach(), history

    (alone, alone_history), (split, split_history) = run(False), run(True)
    assert torch.equal(alone, split) and alone_history == split_history
    assert not torch.equal(alone, torch.zeros(3))


def test_tune_with_zero_epochs_changes_nothing():
    gain = torch.zeros(3, requires_grad=True)
    calls = []

    def batch_losses():
        calls.append(1)
        yield gain.sum()

    assert tune([gain], batch_losses, epochs=0, learning_rate=0.1) == []
    assert not calls and torch.equal(gain, torch.zeros(3))


def test_norms_whose_output_scales_with_their_weight_are_told_apart():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from qep_modifier.block_tuning import gained, scales_with_weight

    llama, gemma = LlamaRMSNorm(8), GemmaRMSNorm(8)
    with torch.no_grad():
        llama.weight.copy_(torch.linspace(0.5, 1.5, 8))
        gemma.weight.copy_(torch.linspace(-0.5, 0.5, 8))
    before = (llama.weight.clone(), gemma.weight.clone())
    assert scales_with_weight(llama)
    assert not scales_with_weight(gemma)  # (1 + weight) * normalised
    assert not scales_with_weight(torch.nn.Linear(8, 8))  # a 2-D weight: not a norm
    assert torch.equal(llama.weight, before[0]) and torch.equal(gemma.weight, before[1])
    # for Llama's norm, an output gain is the same as a weight times that gain
    x, gain = torch.randn(3, 8, dtype=torch.float64), torch.linspace(0.8, 1.2, 8, dtype=torch.float64)
    llama = llama.double()
    expected = llama(x) * gain
    assert torch.allclose(gained(llama.forward, gain, x), expected)
    with torch.no_grad():
        llama.weight.mul_(gain)
    assert torch.allclose(llama(x), expected)


def test_token_relative_error_against_float64():
    from qep_modifier.block_tuning import token_relative_error

    generator = torch.Generator().manual_seed(0)
    target = torch.randn(2, 5, 8, generator=generator, dtype=torch.float64)
    target[0, 0] *= 1000  # a massive-activation token
    output = target + 0.1 * torch.randn(2, 5, 8, generator=generator, dtype=torch.float64)
    reference = sum(
        float(((output[b, t] - target[b, t]) ** 2).sum() / (target[b, t] ** 2).sum())
        for b in range(2)
        for t in range(5)
    ) / 10
    got = token_relative_error(output.float(), target.float())
    assert got.dtype == torch.float32
    assert abs(got.item() - reference) < 1e-6 * reference


def test_mean_loss_sums_exactly_in_any_order():
    # a plain left-to-right sum gives 0.25 here, and another order another value:
    # ranks that see the same losses must take the same keep-or-restore decision
    values = [1e16, 1.0, -1e16, 1.0]
    assert sum(values) / 4 == 0.25
    assert mean_loss(values) == mean_loss(values[::-1]) == 0.5
    assert math.isnan(mean_loss([]))


def test_the_checked_batches_spread_over_the_steps():
    assert checked_batches(3, 8) == [0, 1, 2]  # few batches: all
    assert checked_batches(32, 8) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert checked_batches(10, 4) == [0, 2, 5, 7]
    assert checked_batches(0, 8) == []


def test_the_keep_decision_on_float64_losses():
    assert keeps_tuning(0.5, 0.25)
    assert not keeps_tuning(0.5, 0.5)  # not below the start: nothing gained
    assert not keeps_tuning(0.5, 0.75)
    assert not keeps_tuning(0.5, math.nan) and not keeps_tuning(0.5, math.inf)
    assert not keeps_tuning(math.nan, 0.25)  # no start to compare with


def _channel_problem():
    """Four batches of the closed-form channel problem in float64: the grid's
    weights at 1.3 times their scales produce the targets."""
    codes, scale, zero_point = _grid(rows=4, columns=16, groups=1)
    groups = column_groups(16, scale)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(32, 16, generator=generator, dtype=torch.float64) for _ in range(4)]
    true_weight = (codes - zero_point.double()) * 1.3 * scale
    targets = [x @ true_weight.T for x in inputs]
    gain = torch.zeros_like(scale, requires_grad=True)

    def loss(batch: int) -> torch.Tensor:
        weight = dequantized_weight(codes, scale * gain.exp(), zero_point, groups)
        return (inputs[batch] @ weight.T - targets[batch]).pow(2).mean()

    untuned = (codes - zero_point.double()) * scale
    start = sum(float((x @ untuned.T - y).pow(2).mean()) for x, y in zip(inputs, targets)) / 4
    return gain, loss, start


def _one_process(steps: int) -> dict:
    return dict(steps=TuningSteps([0] * steps, 0, list(range(steps))), share=lambda p, value, owner: value.item(),
                gather=lambda mine: [mine])


@pytest.mark.parametrize("learning_rate, kept", [(0.02, True), (1.0, False), (1000.0, False)])
def test_tuning_is_kept_only_when_it_lowers_the_mean_loss(learning_rate, kept):
    """The channel problem: at 0.02 Adam lowers the mean loss over the checked
    batches (measured at fixed parameters before and after); at 1.0 it
    overshoots to a larger loss, at 1000 the scales overflow (final loss nan)."""
    gain, loss, reference_start = _channel_problem()
    outcome = checked_tuning([gain], lambda: range(4), loss, 5, learning_rate, **_one_process(4))
    assert abs(outcome.start_loss - reference_start) <= 1e-12 * reference_start
    assert len(outcome.history) == 5
    assert outcome.kept is kept, outcome
    assert kept == (outcome.final_loss < outcome.start_loss)
    if learning_rate == 1000.0:
        assert not torch.isfinite(gain).all() and math.isnan(outcome.final_loss)


def test_checked_tuning_checks_only_the_checked_batches():
    gain, loss, _ = _channel_problem()
    seen = []

    def counted(batch):
        seen.append(batch)
        return loss(batch)

    steps = TuningSteps([0] * 4, 0, [1, 3])
    outcome = checked_tuning([gain], lambda: range(4), counted, 1, 0.02, steps, lambda p, v, o: v.item(), lambda m: [m])
    assert seen == [1, 3, 0, 1, 2, 3, 1, 3]  # checked before, the epoch's steps, checked after
    with torch.no_grad():
        final = (loss(1).item() + loss(3).item()) / 2
    assert abs(outcome.final_loss - final) <= 1e-12 * final


def test_checked_tuning_on_two_ranks_is_one_process_on_both_shards():
    """Rank 0 of two holds batches 0 and 1, rank 1 batches 2 and 3: with the
    other rank's gradients and checked losses handed over (as share_step and
    gather do), rank 0 ends bit for bit where one process ends on all four."""
    gain, loss, _ = _channel_problem()
    alone = checked_tuning([gain], lambda: range(4), loss, 3, 0.02, **_one_process(4))
    alone_gain = gain.detach().clone()

    gain, loss, _ = _channel_problem()
    owners_seen = []

    def share(parameters, value, owner):
        owners_seen.append(owner)
        if value is not None:
            return value.item()
        with torch.enable_grad():  # what rank 1 computed and sent: steps 2 and 3 are batches 2 and 3
            value = loss((len(owners_seen) - 1) % 4)
            value.backward()
        return value.item()

    def gather(mine):
        with torch.no_grad():
            return [mine, [loss(2).item(), loss(3).item()]]

    steps = TuningSteps([0, 0, 1, 1], 0, [0, 1])
    split = checked_tuning([gain], lambda: range(2), loss, 3, 0.02, steps, share, gather)
    assert owners_seen == [0, 0, 1, 1] * 3
    assert torch.equal(gain.detach(), alone_gain) and not torch.equal(alone_gain, torch.zeros_like(alone_gain))
    assert split == alone and split.kept


# ----------------------------------------------------------- moving the codes
def test_rounded_codes_round_and_clamp_forward_and_pass_gradients_straight_through():
    generator = torch.Generator().manual_seed(0)
    latent = (torch.rand(5, 7, generator=generator, dtype=torch.float64) * 16 - 7).requires_grad_(True)
    # by hand in float64: round half to even (Python's round), then clamp to [-4, 3]
    reference = torch.tensor(
        [[min(3.0, max(-4.0, float(round(value)))) for value in row] for row in latent.tolist()],
        dtype=torch.float64,
    )
    assert (latent < -4.5).any() and (latent > 3.5).any()  # the clamp is exercised
    upstream = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    with torch.enable_grad():
        codes = rounded_codes(latent, -4, 3)
        (codes * upstream).sum().backward()
    assert codes.dtype == torch.float64 and torch.equal(codes.detach(), reference)
    assert torch.equal(latent.grad, upstream)  # identity, also where clamped


def test_latent_codes_start_within_half_a_step_and_round_to_the_codes():
    codes = torch.tensor([[0.0, 3.0, -4.0, 2.0, 1.0]])
    unrounded = torch.tensor([[0.3, 2.6, -9.0, 2.5, 1.0]])  # -9: the clamp moved it
    latent = latent_codes(codes, unrounded)
    expected = torch.tensor([[0.3, 2.6, -4.499, 2.499, 1.0]], dtype=torch.float64)
    assert torch.allclose(latent.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(latent.round(), codes)


def _code_problem():
    """One channel-scaled Linear whose best codes are one step off the start in
    a few places: the target weight sits on the grid at other codes."""
    generator = torch.Generator().manual_seed(3)
    codes, scale, zero_point = _grid(rows=4, columns=16, groups=1)
    groups = column_groups(16, scale)
    better = codes.clone()
    better[0, 2] += 1
    better[1, 5] -= 1
    better[3, 9] += 1
    better = better.clamp(0, 7)
    assert not torch.equal(better, codes)
    inputs = [torch.randn(32, 16, generator=generator, dtype=torch.float64) for _ in range(4)]
    targets = [x @ dequantized_weight(better, scale, zero_point, groups).T for x in inputs]
    return codes, better, scale, zero_point, groups, inputs, targets


@pytest.mark.parametrize("moving", ["codes", "gains"])
def test_tune_with_a_rate_per_parameter_moves_only_those_with_a_rate(moving):
    codes, better, scale, zero_point, groups, inputs, targets = _code_problem()
    latent = codes.clone().requires_grad_(True)
    gain = torch.zeros_like(scale, requires_grad=True)

    def batch_losses():
        for x, y in zip(inputs, targets):
            weight = dequantized_weight(rounded_codes(latent, 0, 7), scale * gain.exp(), zero_point, groups)
            yield (x @ weight.T - y).pow(2).mean()

    rates = [0.0, 0.1] if moving == "codes" else [0.02, 0.0]
    history = tune([gain, latent], batch_losses, epochs=30, learning_rate=rates)
    assert history[-1] < history[0]
    if moving == "codes":
        assert torch.equal(gain, torch.zeros_like(scale))
        moved = latent.detach().round().clamp(0, 7)
        assert not torch.equal(moved, codes)
        # the loss pulls the codes toward the target's: more of them agree
        assert (moved == better).sum() > (codes == better).sum()
    else:
        assert torch.equal(latent.detach(), codes) and not torch.equal(gain, torch.zeros_like(scale))


def test_tune_with_one_rate_per_parameter_equal_to_one_rate_for_all_is_the_same():
    def run(learning_rate):
        first, second = torch.zeros(3, requires_grad=True), torch.ones(2, requires_grad=True)

        def losses():  # each computed when the loop asks for it
            yield (first - 1).pow(2).sum() + (second * first[:2]).sum()
            yield second.pow(2).sum()

        history = tune([first, second], losses, epochs=3, learning_rate=learning_rate)
        return first.detach(), second.detach(), history

    single, per_parameter = run(0.1), run([0.1, 0.1])
    assert all(torch.equal(a, b) for a, b in zip(single[:2], per_parameter[:2]))
    assert single[2] == per_parameter[2]
    with pytest.raises(ValueError, match="2 learning rates for 3"):
        tune([torch.zeros(1, requires_grad=True)] * 3, lambda: [], epochs=1, learning_rate=[0.1, 0.1])


def test_linear_decay_schedule_against_float64_arithmetic():
    """Loss ``sum(p)`` has the constant gradient 1, so each Adam step moves a
    float64 parameter by its step's rate / (1 + eps) (up to float64 rounding):
    the decaying one by ``r (1 - k / N)`` at step k of N = epochs x steps per
    epoch, in all ``r (N + 1) / 2``; the constant one by ``r N``."""
    epochs, steps_per_epoch, rate = 4, 3, 0.01
    decaying = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    constant = torch.zeros(2, dtype=torch.float64, requires_grad=True)

    def batch_losses():
        for _ in range(steps_per_epoch):
            yield decaying.sum() + constant.sum()

    tune(
        [decaying, constant], batch_losses, epochs, [rate, rate],
        decaying=([True, False], steps_per_epoch),
    )
    steps = epochs * steps_per_epoch
    eps = 1e-8  # Adam's default
    by_hand = math.fsum(rate * (1 - step / steps) for step in range(steps)) / (1 + eps)
    assert abs(by_hand - rate * (steps + 1) / 2 / (1 + eps)) < 1e-15
    torch.testing.assert_close(-decaying.detach(), torch.full((2,), by_hand, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        -constant.detach(), torch.full((2,), rate * steps / (1 + eps), dtype=torch.float64), rtol=1e-12, atol=0
    )
    # the factor itself: 1 at the first step, 1/N at the last, never below 0
    assert linear_decay(0, steps) == 1.0 and math.isclose(linear_decay(steps - 1, steps), 1 / steps, rel_tol=1e-12)
    assert linear_decay(steps, steps) == 0.0 and linear_decay(steps + 5, steps) == 0.0


#: Each family's norms in a decoder layer, as block tuning sees them: name -> (offset, bias).
_LAYER_NORMS = {
    "llama": {"input_layernorm": (0, False), "post_attention_layernorm": (0, False)},
    # q/k norms over the head dimension
    "qwen3": {
        "input_layernorm": (0, False), "post_attention_layernorm": (0, False),
        "self_attn.q_norm": (0, False), "self_attn.k_norm": (0, False),
    },
    # Gemma's (1 + w) RMSNorm, sandwich norms around attention and MLP
    "gemma2": {
        "input_layernorm": (1, False), "post_attention_layernorm": (1, False),
        "pre_feedforward_layernorm": (1, False), "post_feedforward_layernorm": (1, False),
    },
    "gemma3": {
        "input_layernorm": (1, False), "post_attention_layernorm": (1, False),
        "pre_feedforward_layernorm": (1, False), "post_feedforward_layernorm": (1, False),
        "self_attn.q_norm": (1, False), "self_attn.k_norm": (1, False),
    },
    # post-norms and q/k norms over the whole projection width
    "olmo2": {
        "post_attention_layernorm": (0, False), "post_feedforward_layernorm": (0, False),
        "self_attn.q_norm": (0, False), "self_attn.k_norm": (0, False),
    },
    # LayerNorm with weight and bias; NeoX and Falcon with parallel attention and MLP
    "opt": {"self_attn_layer_norm": (0, True), "final_layer_norm": (0, True)},
    "gpt_neox": {"input_layernorm": (0, True), "post_attention_layernorm": (0, True)},
    "falcon": {"input_layernorm": (0, True)},
}


def _layers(model):
    for path in ("model.layers", "model.decoder.layers", "gpt_neox.layers", "transformer.h"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise AssertionError(f"no decoder layers in {type(model).__name__}")


def _tuned_norms(layer):
    from qep_modifier.block_tuning import NormForm, is_norm, norm_form

    found = {name: norm_form(module) for name, module in layer.named_modules() if is_norm(module)}
    assert all(isinstance(form, NormForm) for form in found.values()), found
    return found


@pytest.mark.parametrize("family", list(_LAYER_NORMS))
def test_a_norm_gain_is_the_same_as_its_changed_parameters_float64(family):
    # every norm form block tuning tunes: the model with an output gain on each norm
    # of every layer gives, to float64 rounding, the logits of the model with the
    # norms' weights (and biases) written back as block tuning writes them
    import copy
    from functools import partial

    from compressed_tensors.utils import patch_attr

    from qep_modifier.block_tuning import NormForm, gained, gained_norm_parameters
    from tests.models import tiny_family_model

    model = tiny_family_model(family, dtype=torch.float64)
    written = copy.deepcopy(model)
    input_ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    patches = []
    for layer, written_layer in zip(_layers(model), _layers(written)):
        forms = _tuned_norms(layer)
        assert {name: (form.offset, form.bias) for name, form in forms.items()} == _LAYER_NORMS[family]
        for name, form in forms.items():
            norm, target = layer.get_submodule(name), written_layer.get_submodule(name)
            gain = 0.5 + torch.rand(norm.weight.shape, generator=generator, dtype=torch.float64)
            patches.append(patch_attr(norm, "forward", partial(gained, norm.forward, gain)))
            weight, bias = gained_norm_parameters(form, norm.weight.detach(), getattr(norm, "bias", None), gain)
            with torch.no_grad():
                target.weight.copy_(weight)
                if form.bias:
                    target.bias.copy_(bias)
    with torch.no_grad():
        for patch in patches:
            patch.__enter__()
        tuned = model(input_ids=input_ids).logits
        for patch in patches:
            patch.__exit__(None, None, None)
        untouched = model(input_ids=input_ids).logits
        rewritten = written(input_ids=input_ids).logits
    assert not torch.allclose(tuned, untouched, atol=1e-3)  # the gains do change the output
    # Gemma's norms compute in float32 whatever the input's dtype: float32 rounding there
    tolerance = 1e-5 if family.startswith("gemma") else 1e-10
    torch.testing.assert_close(rewritten, tuned, rtol=tolerance, atol=tolerance)
    assert isinstance(next(iter(_tuned_norms(_layers(model)[0]).values())), NormForm)


def test_offset_norms_in_the_toolkits_calibration_form_are_plain_float64():
    # oneshot swaps Gemma's (1 + w) norms for CalibrationOffsetNorm (w' = 1 + w) while
    # calibrating and back afterwards: block tuning sees offset 0 there, and a gain
    # written into w' comes back as (1 + w) g - 1
    from llmcompressor.modeling.offset_norm import norm_calibration_context

    from tests.models import tiny_family_model

    model = tiny_family_model("gemma3", dtype=torch.float64)
    input_ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    gain = torch.linspace(0.7, 1.3, 128, dtype=torch.float64)
    with torch.no_grad():
        expected_norm = model.model.layers[0].input_layernorm
        before = expected_norm.weight.clone()
        with norm_calibration_context(model):
            forms = _tuned_norms(model.model.layers[0])
            assert {(form.offset, form.bias) for form in forms.values()} == {(0, False)}
            assert type(model.model.layers[0].input_layernorm).__name__ == "CalibrationOffsetNorm"
            model.model.layers[0].input_layernorm.weight.mul_(gain)
        torch.testing.assert_close(model.model.layers[0].input_layernorm.weight, (1 + before) * gain - 1)
    assert torch.isfinite(model(input_ids=input_ids).logits).all()


class _Squared(torch.nn.Module):
    """A made-up norm whose output is quadratic in its weight."""

    def __init__(self, width):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(width))

    def forward(self, hidden):
        return hidden * self.weight**2


class _GatedRMSNorm(torch.nn.Module):
    """Like Qwen3-Next's gated norm: its forward needs a second input."""

    def __init__(self, width):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(width))

    def forward(self, hidden, gate):
        return hidden * self.weight * torch.nn.functional.silu(gate)


@pytest.mark.parametrize(
    "norm, reason",
    [
        (torch.nn.LayerNorm(8, elementwise_affine=False), "it has no per-channel weight"),
        (_Squared(8), "its output is not linear in its weight"),
        (_GatedRMSNorm(8), "its forward cannot be probed with one input"),
    ],
    ids=["weightless", "quadratic", "gated"],
)
def test_norms_a_gain_cannot_stand_for_are_excluded_with_a_reason(norm, reason):
    from qep_modifier.block_tuning import norm_form

    before = {name: value.clone() for name, value in norm.state_dict().items()}
    assert norm_form(norm).startswith(reason)
    assert all(torch.equal(value, before[name]) for name, value in norm.state_dict().items())


def test_a_layer_with_weightless_norms_names_them_untuned():
    # OLMo (the first) has LayerNorms without parameters: block tuning tunes the
    # layer's scales and names each norm it leaves as it is
    from transformers import OlmoConfig, OlmoForCausalLM

    from qep_modifier.calibrate import _TunedBlock

    torch.manual_seed(0)
    model = OlmoForCausalLM(
        OlmoConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, pad_token_id=0)
    )
    block = _TunedBlock(model.model.layers[0], {})
    assert not block.norms
    assert block.untuned_norms == {
        "input_layernorm": "OlmoLayerNorm: it has no per-channel weight",
        "post_attention_layernorm": "OlmoLayerNorm: it has no per-channel weight",
    }
