"""A Hydra callback for tests: what each job's task function returned, as Hydra (and so any sweeper) got it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

RETURNED_FILE = "returned.json"


class RecordReturns(Callback):
    """Writes `{"status": …, "value": …}` of each job into its output folder."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        completed = job_return.status == JobStatus.COMPLETED
        returned = {"status": job_return.status.name, "value": job_return.return_value if completed else None}
        Path(config.hydra.runtime.output_dir, RETURNED_FILE).write_text(json.dumps(returned))
