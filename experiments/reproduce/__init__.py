"""The paper's experiment: R seeded runs × E epochs per model, Table 1 and Figures 1–2.

``protocol`` runs one (model, seed) and saves its per-epoch records; ``tables`` turns the
records into Table 1 (mean ± std over runs) and the AlexNet comparison; ``plots`` draws the
loss and accuracy curves. ``tools/reproduce_paper.py`` is the command line.
"""
from experiments.reproduce.protocol import ProtocolError, plan_run
from experiments.reproduce.runs import run_once, train_run
from experiments.reproduce.tables import (PAPER, epoch_columns, load_records, summarize,
                                           table1_markdown)

__all__ = ["ProtocolError", "plan_run", "run_once", "train_run", "PAPER", "epoch_columns",
           "load_records", "summarize", "table1_markdown"]
