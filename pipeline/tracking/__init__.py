"""MLflow tracking, one module per concern (the sweep's parent and child runs live with the sweep):

store        where runs go: the store or server checked before any work, experiments, the UI command
provenance   where a run came from: code version, command, host, and what it trained on what
record       everything a run logs, kept on local disk too, so a server that fails mid-run loses nothing
logger       Lightning's MLFlowLogger that records first, then sends through MLflow's asynchronous logging
runs         a run opened, its inputs and files logged, and its end recorded with an honest status
checkpoints  an MLflow run's checkpoint, config and classes brought to local disk (source=, runs:/…)
"""
