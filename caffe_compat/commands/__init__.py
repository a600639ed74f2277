"""The command-line tools' shared code (``tools/train.py``, ``tools/caffe.py``,
``tools/parse_log.py``, ``tools/plot_log.py``).

- ``train``: ``caffe train`` (solver, weights/snapshot, log file, plot, summary);
- ``test_cmd`` / ``time_cmd``: ``caffe test`` and ``caffe time`` (per-layer timing table);
- ``device``: ``--gpu``/``solver_mode`` selection, ``--precision`` autocast, device_query;
- ``signals``: SIGINT/SIGHUP → stop/snapshot/none, as Caffe's SignalHandler;
- ``progress``: the tqdm bar on a terminal, sharing stderr with the glog lines;
- ``logparse`` / ``plot``: read Caffe-format training logs, write CSVs and a PNG.
"""
from caffe_compat.commands.logparse import LogData, Row, parse_lines, parse_log, save_csv_files
from caffe_compat.commands.plot import plot_log, plot_log_data

__all__ = ["LogData", "Row", "parse_lines", "parse_log", "save_csv_files", "plot_log",
           "plot_log_data"]
