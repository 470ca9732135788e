"""Bytes kept for the backward pass: BatchNorm then the activation, against CmBN with the activation
fused (``convert_batchnorm(..., fuse_activation=True)``) under ``memory="standard"`` and ``"lean"``.

    python3 bench/memory.py              # writes bench/results/memory-cpu.json and .md
    python3 bench/memory.py --quick      # tiny sizes (the test suite runs this)

What is counted: every tensor autograd saves during a training forward, seen through
``torch.autograd.graph.saved_tensors_hooks``, one count per storage (a tensor saved by two
operations, such as a layer's output kept by the layer and by the next convolution, counts once),
parameters left out (they are in memory whatever the policy). The bytes do not depend on the device,
so the CPU measures what a GPU would keep. Three parts:

- (a) stacks of Conv-BatchNorm-activation blocks, one per activation; the BatchNorm baseline uses the
  activation in place where torch offers it (``inplace=True``), its smallest footprint;
- (b) timm's cspdarknet53 on a (2, 3, 128, 128) batch, whose loss is the output's sum;
- (c) an ultralytics YOLOv8n training step's forward (the model's own detection loss on random
  boxes), and the largest micro-batch whose step keeps under a fixed budget: the BatchNorm model's
  bytes at micro-batch 8.
"""
import argparse
import copy
import datetime
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _path in (HERE, REPO):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import cmbn_ext  # noqa: E402
from benchmark import device_name  # noqa: E402

# name -> the BatchNorm model's activation module (in place where torch offers it)
ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
    "mish": lambda: nn.Mish(inplace=True),
    "hardswish": lambda: nn.Hardswish(inplace=True),
}
POLICIES = ("standard", "lean")
# The targets: lean bytes / BatchNorm bytes at most this.
STACK_TARGETS = {"relu": None, "leaky_relu": 0.60, "elu": 0.60, "silu": 0.72, "mish": 0.72,
                 "hardswish": 0.72}
CSPDARKNET_TARGET = 0.65
SIZES = {
    "full": {"stack": (8, (4, 32, 32, 32)), "cspdarknet": (2, 3, 128, 128), "yolo": (8, 128, 32)},
    "quick": {"stack": (2, (2, 4, 6, 6)), "cspdarknet": (2, 3, 32, 32), "yolo": (2, 64, 3)},
}


def saved_bytes(model, run):
    """Bytes of the distinct storages autograd saves while ``run()`` runs, the parameters of
    ``model`` left out; then the backward, so that the step is known to work. Returns (bytes,
    tensors, bytes with the saved parameters counted too)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages, saved_parameters = {}, {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if storage.nbytes():
            (saved_parameters if pointer in parameters else storages)[(tensor.device, pointer)] = \
                storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = run()
    total = sum(storages.values())
    loss.backward()
    return total, len(storages), total + sum(saved_parameters.values())


def fused(model, memory):
    return cmbn_ext.convert_batchnorm(copy.deepcopy(model), window=1, fuse_activation=True, memory=memory)


def stack(name, blocks, channels):
    layers = []
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                   ACTIVATIONS[name]()]
    return nn.Sequential(*layers)


def measure_stacks(blocks, shape):
    """(a): per activation, the bytes of each variant, their ratio to BatchNorm's, and the full
    tensors of the block's shape kept per block (the network input's left out)."""
    x = torch.randn(shape)
    tensor_bytes = x.numel() * x.element_size()
    rows = []
    for name in ACTIVATIONS:
        torch.manual_seed(0)
        model = stack(name, blocks, shape[1])
        variants = {"batchnorm": model, **{p: fused(model, p) for p in POLICIES}}
        row = {"activation": name, "blocks": blocks, "shape": list(shape)}
        for variant, net in variants.items():
            total, count, with_parameters = saved_bytes(net, lambda: net(x).sum())
            row[variant] = {"bytes": total, "storages": count, "with_parameters": with_parameters,
                            "tensors_per_block": (total - tensor_bytes) / (blocks * tensor_bytes)}
        for policy in POLICIES:
            row[policy]["ratio"] = row[policy]["bytes"] / row["batchnorm"]["bytes"]
        row["fused"] = len(cmbn_ext.fused_activations(variants["lean"]))
        row["target"] = STACK_TARGETS[name]
        rows.append(row)
    return rows


def measure_cspdarknet(shape):
    """(b): timm's cspdarknet53 (67 BatchNorm + LeakyReLU layers)."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model("cspdarknet53")
    x = torch.randn(shape)
    result = {"shape": list(shape), "target": CSPDARKNET_TARGET}
    for variant, net in (("batchnorm", model), *((p, fused(model, p)) for p in POLICIES)):
        total, count, with_parameters = saved_bytes(net, lambda: net(x).sum())
        result[variant] = {"bytes": total, "storages": count, "with_parameters": with_parameters}
        if variant != "batchnorm":
            result[variant]["fused"] = len(cmbn_ext.fused_activations(net))
    for policy in POLICIES:
        result[policy]["ratio"] = result[policy]["bytes"] / result["batchnorm"]["bytes"]
        result[policy]["ratio_with_parameters"] = (result[policy]["with_parameters"]
                                                   / result["batchnorm"]["with_parameters"])
    return result


def yolo_batch(micro_batch, size, generator):
    """A detection batch as ultralytics' trainer hands it to the loss: images, two random boxes per
    image (normalized xywh) with their classes and image indices."""
    boxes = 2 * micro_batch
    centers = torch.rand(boxes, 2, generator=generator) * 0.6 + 0.2
    extents = torch.rand(boxes, 2, generator=generator) * 0.2 + 0.05
    return {"img": torch.rand(micro_batch, 3, size, size, generator=generator),
            "batch_idx": torch.arange(micro_batch).repeat_interleave(2).float(),
            "cls": torch.randint(0, 80, (boxes, 1), generator=generator).float(),
            "bboxes": torch.cat([centers, extents], 1)}


def yolo_step_bytes(model, micro_batch, size, with_parameters=False):
    batch = yolo_batch(micro_batch, size, torch.Generator().manual_seed(micro_batch))
    model.train()
    model.zero_grad(set_to_none=True)
    measured = saved_bytes(model, lambda: model.loss(batch)[0].sum())
    return measured[2] if with_parameters else measured[0]


def largest_micro_batch(model, size, budget, limit):
    """The largest micro-batch (up to ``limit``) whose step keeps at most ``budget`` bytes."""
    fits = 0
    for micro_batch in range(1, limit + 1):
        if yolo_step_bytes(model, micro_batch, size) > budget:
            break
        fits = micro_batch
    return fits


def measure_yolo(micro_batch, size, limit):
    """(c): ultralytics YOLOv8n, the BatchNorm model against lean CmBN with its SiLU fused."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", verbose=False)
    model.args = get_cfg()  # the loss's hyperparameters, as the trainer sets them
    lean = fused(model, "lean")
    budget = yolo_step_bytes(model, micro_batch, size)
    result = {"image_size": size, "micro_batch": micro_batch, "budget_bytes": budget,
              "batchnorm": {"bytes": budget}, "lean": {"bytes": yolo_step_bytes(lean, micro_batch, size),
                                                       "fused": len(cmbn_ext.fused_activations(lean))}}
    result["lean"]["ratio"] = result["lean"]["bytes"] / budget
    for variant, net in (("batchnorm", model), ("lean", lean)):
        result[variant]["with_parameters"] = yolo_step_bytes(net, micro_batch, size, with_parameters=True)
    result["lean"]["ratio_with_parameters"] = (result["lean"]["with_parameters"]
                                               / result["batchnorm"]["with_parameters"])
    for variant, net in (("batchnorm", model), ("lean", lean)):
        result[variant]["largest_micro_batch"] = largest_micro_batch(net, size, budget, limit)
    return result


def megabytes(n):
    return f"{n / 2**20:.1f}"


def verdict(ratio, target):
    if target is None:
        return "(no target)"
    return f"<= {target:.2f}: {'met' if ratio <= target else 'NOT met'}"


def markdown(results):
    meta = results["meta"]
    lines = [f"# Bytes kept for backward: BatchNorm + activation against fused CmBN ({meta['device_name']})",
             "", f"Generated by `python3 bench/memory.py` on {meta['date']}, {meta['device_name']}, torch "
             f"{meta['torch_version']}, cmbn_ext kernels: {meta['kernels']}.", "", meta["method"], ""]
    stacks = results["stacks"]
    blocks, shape = stacks[0]["blocks"], tuple(stacks[0]["shape"])
    lines += [f"## (a) {blocks} Conv-BN-activation blocks, input {shape} fp32", "",
              "| activation | BatchNorm+act MB (tensors/block) | CmBN standard MB (ratio) | "
              "CmBN lean MB (ratio, tensors/block) | target (lean) |",
              "|---|---|---|---|---|"]
    for r in stacks:
        bn, std, lean = r["batchnorm"], r["standard"], r["lean"]
        lines.append(f"| {r['activation']} | {megabytes(bn['bytes'])} ({bn['tensors_per_block']:.2f}) | "
                     f"{megabytes(std['bytes'])} ({std['ratio']:.3f}) | {megabytes(lean['bytes'])} "
                     f"({lean['ratio']:.3f}, {lean['tensors_per_block']:.2f}) | "
                     f"{verdict(lean['ratio'], r['target'])} |")
    c = results["cspdarknet"]
    lines += ["", f"## (b) timm cspdarknet53, input {tuple(c['shape'])} fp32", "",
              "| variant | MB kept | ratio to BatchNorm | MB with the saved weights (ratio) | layers fused |",
              "|---|---|---|---|---|",
              f"| BatchNorm (BatchNormAct2d) | {megabytes(c['batchnorm']['bytes'])} | 1 | "
              f"{megabytes(c['batchnorm']['with_parameters'])} (1) | - |"]
    for policy in POLICIES:
        lines.append(f"| CmBN {policy} | {megabytes(c[policy]['bytes'])} | {c[policy]['ratio']:.3f} | "
                     f"{megabytes(c[policy]['with_parameters'])} ({c[policy]['ratio_with_parameters']:.3f}) "
                     f"| {c[policy]['fused']} |")
    lines += ["", f"Target: lean {verdict(c['lean']['ratio'], c['target'])} on the bytes without the "
              f"weights; counting the convolution weights the backward keeps as well (they are in "
              f"memory whatever the policy), {verdict(c['lean']['ratio_with_parameters'], c['target'])}."]
    y = results["yolo"]
    lines += ["", f"## (c) ultralytics YOLOv8n training step (detection loss), {y['image_size']}x"
              f"{y['image_size']} images", "",
              f"Budget: the BatchNorm model's bytes at micro-batch {y['micro_batch']}, "
              f"{megabytes(y['budget_bytes'])} MB.", "",
              f"| variant | MB kept at micro-batch {y['micro_batch']} | ratio | with the saved weights "
              f"(ratio) | largest micro-batch under the budget |", "|---|---|---|---|---|",
              f"| BatchNorm + SiLU | {megabytes(y['batchnorm']['bytes'])} | 1 | "
              f"{megabytes(y['batchnorm']['with_parameters'])} (1) | "
              f"{y['batchnorm']['largest_micro_batch']} |",
              f"| CmBN lean ({y['lean']['fused']} SiLU fused) | {megabytes(y['lean']['bytes'])} | "
              f"{y['lean']['ratio']:.3f} | {megabytes(y['lean']['with_parameters'])} "
              f"({y['lean']['ratio_with_parameters']:.3f}) | {y['lean']['largest_micro_batch']} |", "",
              "SiLU is not invertible: the lean layers keep their input, and the saving is the "
              "activation's own saved tensor."]
    return "\n".join(lines)


METHOD = ("Bytes: the distinct storages that autograd saves during one training forward "
          "(torch.autograd.graph.saved_tensors_hooks), parameters left out unless said; a tensor "
          "kept by two operations counts once. The BatchNorm models run their activation in place where "
          "torch offers it. SiLU, Mish and Hardswish are not invertible: their lean layers keep the "
          "input, as standard does, and save by computing the activation in the op (one tensor per "
          "block fewer). "
          "Window 1; the bytes do not depend on the window, the mode or the device.")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sizes = SIZES["quick" if args.quick else "full"]
    cpu = torch.device("cpu")
    kernels = "CPU kernels of cmbn_ext._C" if cmbn_ext.has_cpu_kernels() else "pure-PyTorch reference"
    results = {
        "meta": {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "device_name": device_name(cpu), "torch_version": torch.__version__, "kernels": kernels,
                 "quick": args.quick, "method": METHOD},
        "stacks": measure_stacks(*sizes["stack"]),
        "cspdarknet": measure_cspdarknet(sizes["cspdarknet"]),
        "yolo": measure_yolo(*sizes["yolo"]),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "memory-cpu.json"), "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    text = markdown(results)
    with open(os.path.join(args.out, "memory-cpu.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
