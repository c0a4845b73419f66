"""``onepoch compare``: several methods, budgets and seeds trained and evaluated on equal terms.

A compare recipe (``configs/compare/*.yaml``)::

    name: compare_fashion_mnist_1epoch
    data: {root: data/fashion-mnist}          # data.* for every cell
    methods: [emp_ssl/fashion_mnist_demo, simclr/fashion_mnist_1epoch, ...]   # run recipes, or mappings
                                               # {recipe, label, overrides, budgets, paper}
    budget: epochs                             # epochs | patch_passes | seconds
    budgets: [1]                               # for every method without its own ``budgets``
    seeds: [0]
    eval: {features: [full, map2x2], probes: [linear, knn]}   # the protocol of every cell (other eval
                                                               # keys: EvalConfig's defaults, not the recipes')
    overrides: []                              # any other KEY=VALUE for every cell
    random_init: true                          # also evaluate the network at its initialisation
    paper_note: ''                             # where the methods' ``paper`` numbers come from

A methods entry's ``paper`` maps a budget to a published number or a short text
(``paper: {1: 28.2, 10: 56.5}``): shown beside the measured cells in compare.md's first table, for
reference only; nothing is computed from it.

Each cell (method x budget x seed) is a run directory ``<out>/<name>/<label>_<budget><value>_seed<s>``
trained with ``onepoch.train`` and evaluated with ``onepoch.eval``; its summary goes to ``cell.json``
(written last, atomically). A cell with a ``cell.json`` of the same eval protocol is reused (of
another protocol: evaluated again, not retrained); a cell with a run directory but no ``cell.json``
is resumed from its last checkpoint. So a killed compare, run again, does only the cells not yet done.
Cells run cheapest budget first (every method at the smallest budget, then the next), so a comparison
that spans several sittings has its first complete table early. Each cell runs under a lock, so
several processes started with the same command share the cells (one per core or per GPU).

Budgets: ``epochs`` sets ``train.epochs``; ``patch_passes`` P gives every method P / (views per
image) epochs (the same number of view images through the backbone; views of different sizes count
alike); ``seconds`` S gives ``S / (seconds per step x steps per epoch)`` epochs, the seconds per step
measured in a short calibration run of each method (``calibration.json``), so wall time matches
only as well as that measurement. Epochs may be fractional (``train.epochs``).

Outputs in ``<out>/<name>/``: ``compare.json`` (every cell), ``compare.md`` (tables: every method and
budget in one table with the seeds run and the ``paper`` column, then test accuracy mean ± std over seeds
per budget and per (feature, probe), train time) and figures (matplotlib, PNG) of accuracy
against epochs, training seconds and patch passes, with error bars of ± one standard deviation over seeds.

The package: :mod:`~onepoch.compare.plan` (the recipe and its cells), :mod:`~onepoch.compare.cells`
(running them), :mod:`~onepoch.compare.lock` (a lock per cell), :mod:`~onepoch.compare.tables`
(compare.md, compare.json) and :mod:`~onepoch.compare.figures` (the plots).
"""

from onepoch.compare.cells import cell_epochs, peak_rss_mb, run_cell, run_compare, run_random_init
from onepoch.compare.figures import accuracy_figures, accuracy_series, primary_metric, write_plots
from onepoch.compare.plan import (
    BUDGET_KINDS,
    Cell,
    CompareConfig,
    MethodEntry,
    eval_protocol,
    load_compare_config,
    method_entries,
    plan_cells,
)
from onepoch.compare.tables import cost_line, format_markdown, metric_pairs, summary_table, write_report

__all__ = [
    "BUDGET_KINDS",
    "Cell",
    "CompareConfig",
    "MethodEntry",
    "accuracy_figures",
    "accuracy_series",
    "cell_epochs",
    "cost_line",
    "eval_protocol",
    "format_markdown",
    "load_compare_config",
    "method_entries",
    "metric_pairs",
    "peak_rss_mb",
    "plan_cells",
    "primary_metric",
    "run_cell",
    "run_compare",
    "run_random_init",
    "summary_table",
    "write_plots",
    "write_report",
]
