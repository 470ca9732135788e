"""The demo (``python -m cmbn_ext.demo``): its quick run end to end, the learning-rate protocol, bitwise
determinism across worker processes, the segmentation data and metric against scikit-learn's, and the
tables of docs/demo.md and the README against the committed run. No accuracy is asserted: a smoke run
trains for 2 steps."""
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("skimage")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

# after the skips: the demo needs the extras
from cmbn_ext import demo  # noqa: E402
from cmbn_ext.demo import report, training  # noqa: E402
from cmbn_ext.demo.shapes import CLASS_NAMES, ShapesSegmentation, draw_shapes, mean_iou  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_writes_table_plot_and_json(tmp_path, capsys):
    assert demo.main(["--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0

    table = (tmp_path / "results.md").read_text()
    png = (tmp_path / "results.png").read_bytes()
    record = json.loads((tmp_path / "results.json").read_text())
    assert png.startswith(b"\x89PNG")
    assert "| method |" in table and "CmBN deferred" in table and "GPU ms/step" in table
    # stdout: the headline table only; the full tables (times per step, sweeps) stay in the file
    printed = capsys.readouterr().out
    assert "| CmBN deferred |" in printed and "ms/step" not in printed and "chosen lr" not in printed
    assert demo.TASKS[0].name == "segmentation"
    segmentation = demo.QUICK_TASKS[0]
    gains = next(line for line in printed.splitlines() if line.startswith("| **best CmBN"))
    summary = record["summary"]
    assert gains.strip("|").split("|")[1:] == [
        f" {expected_gain(summary, segmentation, m):+.1f} ({expected_best(summary, segmentation, m)}) "
        for m in segmentation.micro_batches]

    tasks = {task.name: task for task in demo.QUICK_TASKS}
    expected = {(task.name, model, method.name, micro) for task in tasks.values() for model in task.models
                for method in training.METHODS for micro in task.micro_batches
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


def _scores(summary, task, micro):
    return {e["method"]: e["test"] for e in summary
            if (e["task"], e["micro_batch"]) == (task.name, micro)}


def expected_best(summary, task, micro):
    """The best of the four CmBN modes (renorm gradient) at this micro-batch size, by its mean score."""
    scores = _scores(summary, task, micro)
    modes = ("cumulative", "sliding", "EMA", "deferred")
    return max(modes, key=lambda mode: scores[f"CmBN {mode}"])


def expected_gain(summary, task, micro):
    scores = _scores(summary, task, micro)
    return 100 * (scores[f"CmBN {expected_best(summary, task, micro)}"] - scores["BatchNorm, micro-batch"])


def test_the_committed_report_renders_again_from_its_json(tmp_path):
    """results.md is the committed results.json in the current format: rendering it again from the
    JSON alone (no training) gives the committed file, and a plot."""
    committed = ROOT / "results" / "demo"
    (tmp_path / "results.json").write_bytes((committed / "results.json").read_bytes())
    assert demo.main(["--render-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_text() == (committed / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "results.json").read_bytes() == (committed / "results.json").read_bytes()


def test_with_one_worker_the_progress_advances_after_every_run(monkeypatch):
    """Without worker processes too, each run is reported as it ends, before the next one trains."""
    task = ShapesSegmentation(seeds=(0, 1), learning_rates=(1e-3, 3e-3), steps=1, split_sizes=(16, 8, 8))
    methods = [m for m in training.METHODS if m.name in ("BatchNorm, micro-batch", "CmBN deferred")]
    trained, reported = [], []
    original = training.train_one
    monkeypatch.setattr(training, "train_one", lambda *args: trained.append(args[1]) or original(*args))

    class Recorder:
        def start(self, runs_per_config):
            self.runs_per_config = runs_per_config

        def advance(self, config, label):
            reported.append((config, len(trained)))

    progress = Recorder()
    results = training.run_sweep([task], "cpu", 1, progress, methods)
    assert sum(progress.runs_per_config.values()) == len(results) == len(trained)
    assert [count for _, count in reported] == list(range(1, len(results) + 1))
    assert [config for config, _ in reported] == [run.config for run in trained]


def test_a_run_gives_the_same_bits_in_a_worker_process_as_here():
    """What makes the committed table regenerate: runs are deterministic wherever they run."""
    task = ShapesSegmentation(seeds=(0, 1), learning_rates=(3e-3,), steps=2, split_sizes=(32, 16, 16))
    methods = [m for m in training.METHODS if m.name == "CmBN sliding"]  # history across steps

    class Quiet:
        def start(self, runs_per_config):
            pass

        def advance(self, config, label):
            pass

    def scores(workers):
        results = training.run_sweep([task], "cpu", workers, Quiet(), methods)
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


def markdown_table(text, task):
    """The lines (header, rule, rows) of the table in ``text`` whose header starts with the task's score
    columns."""
    start = text.index(f"| method | {task.metric} mb {task.micro_batches[0]} |")
    return text[start:].split("\n\n", 1)[0].splitlines()


def table_cells(lines):
    """``{row label: {column: cell}}`` of a table's lines."""
    columns = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(columns, cells))
            for cells in ([cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:])}


def committed_run():
    """The committed record, its methods, and results.md, the tables the demo wrote from it."""
    record = json.loads((ROOT / "results" / "demo" / "results.json").read_text())
    methods = [training.Method(**fields) for fields in record["methods"]]  # those of the committed run
    return record, methods, (ROOT / "results" / "demo" / "results.md").read_text()


def expected_scores(record, task, method):
    """The score cells of a method's row, from the record itself."""
    (model,) = task.models  # one table per task
    entries = {e["micro_batch"]: e for e in record["summary"]
               if (e["task"], e["model"], e["method"]) == (task.name, model, method.name)}
    return [f"{100 * entries[m]['test']:.1f} ± {100 * entries[m]['test_std']:.1f}" if m in entries else "—"
            for m in task.micro_batches]


def test_the_demo_page_shows_the_committed_run():
    """docs/demo.md holds the committed run's tables as the demo wrote them, their scores are the
    record's, and the page gives its wall time."""
    page = (ROOT / "docs" / "demo.md").read_text()
    record, methods, written = committed_run()
    for task in demo.TASKS:
        lines = markdown_table(page, task)
        assert lines == markdown_table(written, task), task.name
        rows = table_cells(lines)
        assert len(rows) == len(methods), task.name
        for method in methods:
            cells = list(rows[report.method_label(method, task)].values())[1:]
            assert cells[:len(task.micro_batches)] == expected_scores(record, task, method), method.name
    seconds = round(record["wall_seconds"])
    assert f"took {seconds} s ({seconds // 60} min {seconds % 60} s)" in page


def test_the_readme_headline_is_the_committed_run():
    """The README's segmentation table: every method but the ablations, each cell as in the committed
    run's table (the README leaves columns out, never changes one)."""
    readme = (ROOT / "README.md").read_text()
    record, methods, written = committed_run()
    task = demo.TASKS[0]
    shown = table_cells(markdown_table(readme, task))
    committed = table_cells(markdown_table(written, task))
    assert list(shown) == [report.method_label(m, task) for m in methods if not m.ablation]
    for method in methods:
        if method.ablation:
            continue
        label = report.method_label(method, task)
        assert shown[label].items() <= committed[label].items(), label
        scores = [shown[label][f"{task.metric} mb {m}"] for m in task.micro_batches]
        assert scores == expected_scores(record, task, method), label
