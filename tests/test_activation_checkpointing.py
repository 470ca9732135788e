"""Activation checkpointing runs a forward again during the backward: CmBN must pool the recomputed
micro-batch with the history its first run saw, and count it once."""
import copy

import pytest
import torch
import torch.utils.checkpoint

import cmbn_ext


class Block(torch.nn.Module):
    def __init__(self, mode, checkpointed, reentrant):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1),
                                        cmbn_ext.CrossMiniBatchNorm2d(6, mode=mode, window=3),
                                        torch.nn.ReLU())
        self.head = torch.nn.Conv2d(6, 2, 1)
        self.checkpointed, self.reentrant = checkpointed, reentrant

    def forward(self, x):
        if self.checkpointed:
            hidden = torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=self.reentrant)
        else:
            hidden = self.body(x)
        return self.head(hidden)


def _train(model, batches):
    outputs = []
    for x in batches:
        y = model(x.requires_grad_())
        y.square().mean().backward()
        outputs.append(y.detach())
    return outputs + [p.grad for p in model.parameters()] + list(model.state_dict().values())


@pytest.mark.parametrize("mode", ["cumulative", "sliding", "ema"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_training_equals_plain_training(mode, reentrant):
    torch.manual_seed(0)
    plain = Block(mode, checkpointed=False, reentrant=reentrant)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointed = True
    batches = [torch.randn(2, 3, 5, 5) * (i + 1) for i in range(5)]
    expected = _train(plain, [b.clone() for b in batches])
    got = _train(checkpointed, [b.clone() for b in batches])
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_two_forwards_before_one_backward_is_refused():
    """With CmBN inside a checkpointed region, each micro-batch's backward must come before the next
    forward: otherwise the recomputation could not see the right history, and says so."""
    model = Block("cumulative", checkpointed=True, reentrant=False)
    loss = sum(model(torch.randn(2, 3, 5, 5)).square().mean() for _ in range(2))
    with pytest.raises(RuntimeError, match="activation checkpointing"):
        loss.backward()
