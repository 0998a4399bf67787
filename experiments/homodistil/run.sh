#!/usr/bin/env bash
# The HomoDistil experiment of experiments/homodistil/README.md, on CPU with the machine's
# local data (../shared/data): stages run in order, each in its own run directory under $OUT.
#   1. mlm       MiniLM gets a trained MLM head (method=mlm on the corpus)
#   2. homo      HomoDistil from that teacher to half width (cubic schedule)
#   3. oneshot   the same budget with one-shot pruning
#   4. ft_*      fine-tuning on SST-2: homo, oneshot, bert3 (first 3 MiniLM layers), teacher
#   homo_repr / oneshot_repr: stages 2-3 without the MLM and KL terms, from MiniLM itself
# Usage: experiments/homodistil/run.sh [stage ...]   (default: all stages)
set -euo pipefail
DATA=${KDLAB_SHARED_DATA:-$(cd "$(dirname "$0")/../../.." && pwd)/shared/data}
OUT=${OUT:-runs/homodistil}
STEPS=${STEPS:-300}          # optimizer steps of stages 1-3
VAL_EVERY=${VAL_EVERY:-100}  # steps between validations
SEQ=${SEQ:-64}               # tokens per corpus chunk
BATCH=${BATCH:-32}
FT_SAMPLES=${FT_SAMPLES:-4000}
FT_SEQ=${FT_SEQ:-64}
CORPUS="task=corpus/local task.files=['$DATA/corpus/wikitext-2-raw/*.raw','$DATA/corpus/gutenberg/[a-z]*-*.txt']"
COMMON="logger=csv callbacks=quiet trainer=cpu trainer.enable_progress_bar=false trainer.max_epochs=1 \
  trainer.log_every_n_steps=5 trainer.num_sanity_val_steps=0"
CORPUS_RUN="$CORPUS task.max_seq_length=$SEQ task.batch_size=$BATCH task.max_eval_samples=128 \
  trainer.max_steps=$STEPS trainer.val_check_interval=$VAL_EVERY optim.warmup_ratio=0.06"
PRUNE="model=minilm_half pruning.update_interval=2 \
  pruning.track_interval=2 pruning.initial_warmup=0.1 pruning.final_warmup=0.3 optim.lr=2e-4"
SST2="task=sst2 task.data_dir=$DATA/glue/SST-2 task.max_train_samples=$FT_SAMPLES \
  task.max_seq_length=$FT_SEQ optim.lr=${FT_LR:-1e-4} eval.speed_batches=10"

TRAINED_TEACHER="teacher=local teacher.path=$OUT/mlm/student eval.speed_batches=10"
REPR="method.alpha_mlm=0 method.alpha_kl=0 eval.speed_batches=10"

train() { python -m kdlab.train $COMMON "$@"; }

stage() {
  case $1 in
    ft_bert3) train method=finetune model=bert3 $SST2 hydra.run.dir=$OUT/ft_bert3 ;;
    ft_teacher) train method=finetune model=minilm $SST2 hydra.run.dir=$OUT/ft_teacher ;;
    mlm) train method=mlm model=minilm $CORPUS_RUN optim.lr=5e-4 eval.speed_batches=0 hydra.run.dir=$OUT/mlm ;;
    homo) train method=homodistil $PRUNE $TRAINED_TEACHER $CORPUS_RUN hydra.run.dir=$OUT/homo ;;
    oneshot) train method=homodistil $PRUNE $TRAINED_TEACHER pruning=oneshot $CORPUS_RUN hydra.run.dir=$OUT/oneshot ;;
    # Representation-only HomoDistil (no MLM/KL terms): needs no trained MLM head.
    homo_repr) train method=homodistil $PRUNE $REPR $CORPUS_RUN hydra.run.dir=$OUT/homo_repr ;;
    oneshot_repr) train method=homodistil $PRUNE $REPR pruning=oneshot $CORPUS_RUN hydra.run.dir=$OUT/oneshot_repr ;;
    ft_*) train method=finetune model=pretrained model.path=$OUT/${1#ft_}/student $SST2 hydra.run.dir=$OUT/$1 ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}

for s in "${@:-mlm homo oneshot ft_homo ft_oneshot ft_bert3 ft_teacher}"; do
  for one in $s; do stage "$one"; done
done
