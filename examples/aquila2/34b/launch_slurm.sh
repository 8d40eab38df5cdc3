#!/usr/bin/env bash
# Aquila2-34B pretraining under Slurm: one torchrun per node (srun), c10d rendezvous on the first node
# of the allocation. Submit from the repository root; extra arguments are recipe overrides:
#   sbatch examples/aquila2/34b/launch_slurm.sh data.data_path='[/data/aquila/corpus_text_document]'
# Change --nodes (or pass sbatch --nodes N) for another cluster size; the layout must divide it:
#   python -m megatron_aquila.plan examples/aquila2/34b/aquila2_34b.yaml --nodes N --gpus-per-node 8 --gpu A100-40G
# In a container (e.g. Slurm's pyxis plugin) add the image to the srun line:
#   --container-image=<image built from ./Dockerfile> --container-mounts=<data and checkpoint dirs>
# Stopping before the time limit: Slurm sends SIGUSR1 to this batch shell 600 s before the limit
# (--signal=B:USR1@600; up to 60 s earlier), which forwards it to every rank: they finish the
# iteration, save and exit 0. The lead time must cover one iteration plus one save (docs/gpu.md
# section 6); change it at submission: sbatch --signal=B:USR1@900 examples/aquila2/...
#SBATCH --job-name=aquila2-34b
#SBATCH --nodes=64
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=aquila2-34b-%j.out
#SBATCH --signal=B:USR1@600
set -euo pipefail
# sbatch runs a copy of this script, so find the repository from the submit directory.
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
RECIPE=examples/aquila2/34b/aquila2_34b.yaml
if [ ! -f "$REPO_DIR/$RECIPE" ]; then
    echo "launch_slurm.sh: $REPO_DIR/$RECIPE not found; submit from the repository root or set REPO_DIR" >&2
    exit 2
fi
exec bash "$REPO_DIR/examples/aquila2/srun_torchrun.sh" "$REPO_DIR" "$RECIPE" "$@"
