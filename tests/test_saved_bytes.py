"""What a training forward keeps for the backward, counted with ``saved_tensors_hooks`` (one count per
storage): on a stack of Conv-BatchNorm-activation blocks, fusing the activation saves one block-sized
tensor per block against BatchNorm then the activation, under ``memory="lean"`` for the invertible
activations (the layer keeps its output, which the next convolution keeps too) and under either
policy for the others (the activation's own saved input is gone). The expected savings are computed
from the block's shape. And bench/memory.py runs on tiny sizes.
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import cmbn_ext

BLOCKS, SHAPE = 4, (2, 8, 10, 10)
BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)  # bench/ holds scripts, not a package

import memory  # noqa: E402


def saved_bytes(model, x):
    """Bytes of the distinct storages saved by one training forward (parameters left out), counted as
    bench/memory.py counts them."""
    return memory.saved_bytes(model, lambda: model(x).sum())[0]


def stack(activation):
    layers = []
    for _ in range(BLOCKS):
        layers += [nn.Conv2d(SHAPE[1], SHAPE[1], 3, padding=1, bias=False), nn.BatchNorm2d(SHAPE[1]),
                   activation()]
    return nn.Sequential(*layers)


# activation, the BatchNorm model's module, and how many block-sized tensors each policy saves. An
# in-place activation keeps BatchNorm's output, which the next convolution keeps too: per block, the
# BatchNorm input and output. Fused, standard keeps the same two, except the last block's output
# that no convolution follows; lean keeps the output only. An activation that is not in place keeps
# its input as well: fusing saves that one, under either policy.
CASES = [("leaky_relu", lambda: nn.LeakyReLU(0.1, inplace=True), {"standard": 1, "lean": BLOCKS}),
         ("elu", lambda: nn.ELU(0.5, inplace=True), {"standard": 1, "lean": BLOCKS}),
         ("silu", nn.SiLU, {"standard": BLOCKS, "lean": BLOCKS}),
         ("mish", nn.Mish, {"standard": BLOCKS, "lean": BLOCKS}),
         ("hardswish", nn.Hardswish, {"standard": BLOCKS, "lean": BLOCKS})]


@pytest.mark.parametrize("name,activation,saving", CASES, ids=[c[0] for c in CASES])
def test_fused_layers_keep_a_tensor_per_block_less(name, activation, saving):
    x = torch.randn(SHAPE)
    tensor = x.numel() * x.element_size()
    per_channel = SHAPE[1] * 8  # a per-channel statistic, at most fp64
    model = stack(activation)
    baseline = saved_bytes(model, x)
    for memory in ("standard", "lean"):
        fused = cmbn_ext.convert_batchnorm(copy.deepcopy(model), window=1, fuse_activation=True,
                                           memory=memory)
        assert len(cmbn_ext.fused_activations(fused)) == BLOCKS
        kept = saved_bytes(fused, x)
        # give or take a few per-channel statistics per block
        expected = baseline - saving[memory] * tensor
        assert abs(kept - expected) <= BLOCKS * 8 * per_channel, (memory, kept, baseline, tensor)
    assert kept < baseline


def test_lean_keeps_fewer_bytes_than_standard_only_when_invertible():
    x = torch.randn(SHAPE)
    for name, keeps_less in (("leaky_relu", True), ("elu", True), ("silu", False), ("relu", False)):
        layer = {m: cmbn_ext.CrossMiniBatchNorm2d(SHAPE[1], activation=name, memory=m)
                 for m in ("standard", "lean")}
        # the layer alone, after a convolution whose output it would otherwise keep
        conv = nn.Conv2d(SHAPE[1], SHAPE[1], 1)
        standard, lean = (saved_bytes(nn.Sequential(conv, layer[m], nn.Conv2d(SHAPE[1], SHAPE[1], 1)), x)
                          for m in ("standard", "lean"))
        assert (lean < standard) == keeps_less, name


def test_memory_benchmark_runs(tmp_path):
    """bench/memory.py --quick writes its JSON and markdown with the three parts and finite ratios."""
    environment = dict(os.environ, CMBN_DISABLE_KERNELS=os.environ.get("CMBN_DISABLE_KERNELS", "0"))
    result = subprocess.run([sys.executable, os.path.join(BENCH, "memory.py"), "--quick", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads((tmp_path / "memory-cpu.json").read_text())
    text = (tmp_path / "memory-cpu.md").read_text()
    assert document["meta"]["date"] in text and document["meta"]["device_name"] in text
    assert [row["activation"] for row in document["stacks"]] == ["relu", "leaky_relu", "elu", "silu", "mish",
                                                                 "hardswish"]
    for row in document["stacks"]:
        for policy in ("standard", "lean"):
            assert 0 < row[policy]["ratio"] < 1, row
    assert document["cspdarknet"]["lean"]["fused"] == 67
    assert 0 < document["cspdarknet"]["lean"]["ratio"] < document["cspdarknet"]["standard"]["ratio"] < 1
    yolo = document["yolo"]
    assert yolo["lean"]["largest_micro_batch"] >= yolo["batchnorm"]["largest_micro_batch"] >= 1
    assert "## (c) ultralytics YOLOv8n" in text
