"""GLUE fine-tuning and evaluation with the paper's "GLUE-sane" protocol.

    from ultrafastbert.glue import GlueProtocol, GlueRunSettings
    from ultrafastbert.glue.run import run
    results = run(GlueRunSettings(model_dir="runs/tiny-fff", glue_dir="glue", out_dir="out",
                                  tasks=("RTE", "STS-B"), protocol=GlueProtocol(epochs=5)))
    results["tasks"]["RTE"]["score"], results["average"]["without_cola"]

Pieces: :mod:`.tasks` (the nine tasks as data), :mod:`.data` (TSV / saved ``datasets`` loaders,
tokenisation, training batches), :mod:`.metrics` (scikit-learn / scipy metrics, trivial
baselines), :mod:`.finetune` (the protocol on the shared training loop), :mod:`.run` (the
pipeline, ``results.json`` and the Markdown table). Importing this package needs torch and numpy
only; scikit-learn, scipy, tokenizers and datasets are imported where they are used. The
functions ``run`` and ``finetune`` live in the modules of those names (as
``ultrafastbert.train.pretrain.run``), so the modules stay reachable.
"""

from .data import (
    ClassificationBatches,
    EncodedSplit,
    GlueDataError,
    GlueExample,
    GlueSplit,
    GlueTaskData,
    available_tasks,
    encode_split,
    load_task,
    read_tsv,
)
from .finetune import (
    FinetuneResult,
    FinetuneRuntime,
    GlueProtocol,
    evaluate,
    load_classifier,
    predict,
    save_finetuned,
)
from .metrics import compute_metrics, headline_score, median_metrics, trivial_predictions
from .run import GlueRunSettings, TableRow, averages, results_markdown, table_markdown
from .tasks import SMALL_TASKS, TABLE_ORDER, TASKS, EvalSplit, GlueTask, get_task, parse_tasks

__all__ = [
    "SMALL_TASKS", "TABLE_ORDER", "TASKS", "ClassificationBatches", "EncodedSplit", "EvalSplit",
    "FinetuneResult", "FinetuneRuntime", "GlueDataError", "GlueExample", "GlueProtocol",
    "GlueRunSettings", "GlueSplit", "GlueTask", "GlueTaskData", "TableRow", "available_tasks",
    "averages", "compute_metrics", "encode_split", "evaluate", "get_task",
    "headline_score", "load_classifier", "load_task", "median_metrics", "parse_tasks",
    "predict", "read_tsv", "results_markdown", "save_finetuned", "table_markdown",
    "trivial_predictions",
]
