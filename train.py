"""Hydra entry point: `torchrun --nproc_per_node=N train.py model=moe_small optim=muon_split`.

It only composes the config and hands it to `muon_recipes.train.run`. Under torchrun every rank runs this file;
only rank 0 lets Hydra write its output directory (config snapshot, log file); the other ranks compose the
same config without writing anything and learn the run directory from rank 0 once the process group is up.
"""

import os
import sys

import hydra
from omegaconf import DictConfig

from muon_recipes.config import check_command_line, register_configs

if int(os.environ.get("RANK", "0")) != 0 and not any(a in ("-m", "--multirun") for a in sys.argv):
    sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
                 "hydra.run.dir=."]

if __name__ == "__main__":
    _error = check_command_line(sys.argv[1:], os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf"))
    if not _error:  # Hydra is about to write .hydra/ into hydra.run.dir: not into a directory a live run holds
        from muon_recipes.train.run_dir import hydra_run_dir_in_use

        _error = hydra_run_dir_in_use(sys.argv[1:])
    if _error:  # one line on stderr (rank 0) and exit code 2 on every rank, as for every other bad config value
        from muon_recipes.train.failures import exit_before_start

        exit_before_start(_error)

register_configs()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from muon_recipes.sweep import run_job  # multirun jobs on several devices: a torchrun world each
    from muon_recipes.train import run

    run_job(cfg, run)


if __name__ == "__main__":
    main()
