"""The MLflow model every training logs: a pyfunc from encoded images to their classes.

Payload, the same in Python and over HTTP: a table with one column, `image`, holding the bytes of image files (PNG,
JPEG, anything Pillow reads), one row per image:

    Python   mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [Path("a.png").read_bytes(), ...]}))
    HTTP     POST /invocations  {"dataframe_split": {"columns": ["image"], "data": [["<base64 of a.png>"], ...]}}

The signature declares the column as binary, so MLflow's scoring server decodes the base64 before the model sees it.
The answer has one row per image: `class` (the most likely), `probability` (its probability), `probabilities` (every
class's, in the order of the model's metadata `classes`) and `error` (empty, or why that image could not be decoded:
its other fields are then null; the other rows are classified as usual).

The network, the run's evaluation preprocessing and the class names are the model's artifacts (`weights`: the
network's state dict as safetensors, `classifier`: pipeline.inference.ClassifierSpec as JSON); prediction is
pipeline.inference's, the code `pipeline.predict` runs, so both give the same numbers for the same images. The class
is imported from this package when the model loads: serve it from an environment that has this project installed
(`mlflow models serve --env-manager local` from the project's virtualenv, or the docker image). Its import path is
part of every model logged so far: keep it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

if TYPE_CHECKING:
    from pipeline.inference import Classifier, Outcome

INPUT_COLUMN = "image"
OUTPUT_COLUMNS = ("class", "probability", "probabilities", "error")
WEIGHTS_ARTIFACT, SPEC_ARTIFACT = "weights", "classifier"  # keys of the model's artifacts
BATCH_SIZE = 64  # images per forward pass, as pipeline.predict's default batch_size


class ImageClassifierModel(PythonModel):
    """See the module's docstring."""

    def load_context(self, context: PythonModelContext) -> None:
        import torch
        from safetensors.torch import load_file

        from pipeline.inference import Classifier, ClassifierSpec

        spec = ClassifierSpec.from_json(Path(context.artifacts[SPEC_ARTIFACT]).read_text())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.classifier = Classifier.build(spec, load_file(context.artifacts[WEIGHTS_ARTIFACT]), device)

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        return answer(self.classifier, self.classifier.classify(list(model_input[INPUT_COLUMN]), BATCH_SIZE))


def answer(classifier: Classifier, outcomes: list[Outcome]) -> pd.DataFrame:
    """One row per image: the top class (chosen as pipeline.predict chooses it), its probability, every class's
    probability, the error."""
    rows: list[tuple[Any, ...]] = []
    for outcome in outcomes:
        if outcome.probabilities is None:
            rows.append((None, None, None, outcome.error))
            continue
        ((name, probability),) = classifier.top(outcome.probabilities, 1)
        rows.append((name, probability, outcome.probabilities.tolist(), ""))  # Python floats: JSON writes them exactly
    return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS), dtype=object)
