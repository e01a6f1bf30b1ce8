"""Model families written from their papers, registered into timm's registry on import.

Importing this package is what makes `timm.create_model("lenet5", ...)` work; every model, ours and
timm's, is then built by the one factory in `pipeline.models.factory`. Registered here:
lenet5; classic_resnet18/34/50/101/152 and classic_resnet18/34/50_cifar (timm's own resnet* are different
networks and keep their names); nin; googlenet and googlenet_cifar.
"""

from pipeline.models import inception, lenet, nin, resnet  # noqa: F401  (registers the models)
