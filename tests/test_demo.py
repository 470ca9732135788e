"""The demo (``python -m cmbn_ext.demo``): its quick run end to end, the learning-rate protocol, bitwise
determinism across worker processes, the segmentation data and metric against scikit-learn's, and the
README's table against the committed run. No accuracy is asserted: a smoke run trains for 2 steps."""
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("skimage")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

# after the skips: the demo needs the extras
from cmbn_ext import demo, demo_report, demo_training  # noqa: E402
from cmbn_ext.demo_shapes import CLASS_NAMES, ShapesSegmentation, draw_shapes, mean_iou  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_writes_table_plot_and_json(tmp_path, capsys):
    assert demo.main(["--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0

    table = (tmp_path / "results.md").read_text()
    png = (tmp_path / "results.png").read_bytes()
    record = json.loads((tmp_path / "results.json").read_text())
    assert png.startswith(b"\x89PNG")
    assert "| method |" in table and "CmBN cumulative" in table and "GPU ms/step" in table
    assert "| method |" in capsys.readouterr().out

    tasks = {task.name: task for task in demo.QUICK_TASKS}
    expected = {(task.name, model, method.name, micro) for task in tasks.values() for model in task.models
                for method in demo_training.METHODS for micro in task.micro_batches
                if not method.ablation or micro in task.ablation_micro_batches}
    summary = {(e["task"], e["model"], e["method"], e["micro_batch"]): e for e in record["summary"]}
    assert set(summary) == expected
    for key, entry in summary.items():
        task = tasks[entry["task"]]
        trained = key[:3] + (entry["ran_at_micro_batch"],)
        runs = [r for r in record["runs"]
                if (r["task"], r["model"], r["method"], r["micro_batch"]) == trained]
        # The protocol: every learning rate with the first seed, the best on validation with the others.
        sweep = {r["lr"]: r["val"] for r in runs if r["seed"] == task.seeds[0]}
        assert sorted(sweep) == sorted(task.learning_rates), key
        best = max(sweep.values())
        assert entry["lr"] == min(lr for lr, val in sweep.items() if val == best), key
        later = [r for r in runs if r["seed"] != task.seeds[0]]
        assert sorted(r["seed"] for r in later) == sorted(task.seeds[1:])
        assert all(r["lr"] == entry["lr"] for r in later)
        reported = [r["test"] for r in runs if r["lr"] == entry["lr"]]
        assert entry["test"] == pytest.approx(sum(reported) / len(reported)), key
        assert all(0 <= r["test"] <= 1 and 0 <= r["val"] <= 1 for r in runs)
        assert entry["cpu_ms_per_step"] > 0
        assert (entry["cuda_ms_per_step"] is None) == (not torch.cuda.is_available())


def test_a_run_gives_the_same_bits_in_a_worker_process_as_here():
    """What makes the committed table regenerate: runs are deterministic wherever they run."""
    task = ShapesSegmentation(seeds=(0, 1), learning_rates=(3e-3,), steps=2, split_sizes=(32, 16, 16))
    methods = [m for m in demo_training.METHODS if m.name == "CmBN sliding"]  # history across steps

    class Quiet:
        def start(self, total):
            pass

        def advance(self, label):
            pass

    def scores(workers):
        results = demo_training.run_sweep([task], "cpu", workers, Quiet(), methods)
        return {(r["method"], r["micro_batch"], r["seed"]): (r["val"], r["test"], r["final_train_loss"])
                for r in results}

    here, in_workers = scores(1), scores(2)
    assert len(here) == len(methods) * len(task.micro_batches) * len(task.seeds)
    assert here == in_workers


def test_the_shapes_are_labelled_pixel_by_pixel_and_redrawn_the_same():
    images, labels = draw_shapes(64, 32, (8, 20), seed=5)
    assert images.shape == (64, 1, 32, 32) and labels.shape == (64, 32, 32)
    assert torch.equal(draw_shapes(64, 32, (8, 20), seed=5)[0], images)
    assert not torch.equal(draw_shapes(64, 32, (8, 20), seed=6)[0], images)
    assert set(labels.unique().tolist()) == set(range(len(CLASS_NAMES)))
    for image, label in zip(images[:, 0], labels):
        background = image[label == 0]
        assert background.numel() > 0 and torch.all(background == background[0])
        # every shape pixel stands out from the background (0.4 before scaling by 1 / 0.3)
        assert torch.all((image[label > 0] - background[0]).abs() > 0.4 / 0.3 - 1e-5)


def test_mean_iou_is_scikit_learns_macro_jaccard():
    from sklearn.metrics import confusion_matrix, jaccard_score

    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(4, (5000,), generator=generator)
    predicted = torch.where(torch.rand(5000, generator=generator) < 0.6, truth,
                            torch.randint(4, (5000,), generator=generator))
    confusion = torch.from_numpy(confusion_matrix(truth, predicted, labels=range(4)))
    assert mean_iou(confusion) == pytest.approx(jaccard_score(truth, predicted, average="macro"))


def test_the_segmentation_score_is_the_mean_iou_of_the_models_predictions():
    from sklearn.metrics import jaccard_score

    task = ShapesSegmentation()
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(4, (10, 8, 8), generator=generator)
    predicted = torch.where(torch.rand(10, 8, 8, generator=generator) < 0.7, labels, 0)

    class Oracle(torch.nn.Module):  # "predicts" the class its input pixel holds
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 4).permute(0, 3, 1, 2).float()

    expected = jaccard_score(labels.flatten(), predicted.flatten(), average="macro")
    assert task.score(Oracle(), predicted.unsqueeze(1).float(), labels, batch=3) == pytest.approx(expected)


def readme_table(readme, task):
    """``{row label: [cells]}`` of the README table whose header starts with the task's score columns."""
    header = f"| method | {task.metric} mb {task.micro_batches[0]} |"
    start = readme.index(header)
    lines = readme[start:].split("\n\n", 1)[0].splitlines()[2:]
    return {line.split(" | ")[0][2:]: [cell.strip() for cell in line.strip("|").split("|")[1:]]
            for line in lines}


def test_the_readme_shows_the_committed_run():
    """The README's demo tables hold the committed results/demo scores, and its wall time."""
    readme = (ROOT / "README.md").read_text()
    record = json.loads((ROOT / "results" / "demo" / "results.json").read_text())
    for task in demo.TASKS:
        (model,) = task.models  # one table per task
        rows = readme_table(readme, task)
        assert len(rows) == len(demo_training.METHODS), task.name
        for method in demo_training.METHODS:
            entries = {e["micro_batch"]: e for e in record["summary"]
                       if (e["task"], e["model"], e["method"]) == (task.name, model, method.name)}
            scores = [f"{100 * entries[m]['test']:.1f} ± {100 * entries[m]['test_std']:.1f}"
                      if m in entries else "—" for m in task.micro_batches]
            cells = rows[demo_report.method_label(method, task)]
            assert cells[:len(scores)] == scores, (task.name, method.name)
    seconds = round(record["wall_seconds"])
    assert f"took {seconds} s ({seconds // 60} min {seconds % 60} s)" in readme
