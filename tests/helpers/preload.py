"""What the forked commands import before they start (tests/helpers/commands.py), imported as a command's own process
would import it.

A command configures logging (Hydra's job_logging: the run's log file on the root logger) before it imports Lightning,
and Lightning, finding the root logger with a handler, leaves its loggers propagating to it: its messages reach the
console through the `lightning` logger ("INFO: …") and the run's log file through the root. Imported with no root
handler, as a bare import here would be, Lightning gives its loggers handlers of their own and stops them propagating:
a forked command would print its messages otherwise and leave them out of its log file. A placeholder handler on the
root stands for the command's logging while the modules are imported.

Only what the commands themselves import belongs here: mlflow.pytorch, for one, imports pytorch_lightning, which takes
over the logger that Lightning's rank-zero messages go to (lightning_utilities.core.rank_zero.log).
"""

import logging

_placeholder = logging.NullHandler()
logging.getLogger().addHandler(_placeholder)
try:
    import sklearn.datasets  # the digits' loader, imported when the data are loaded
    import sklearn.model_selection  # noqa: F401

    import pipeline.run  # torch, Lightning, timm, MLflow: what `pipeline.train` imports
    import pipeline.sweep.driver  # noqa: F401  # and the sweep driver (Ray)
finally:
    logging.getLogger().removeHandler(_placeholder)
