"""Notebook-first research-to-production framework for retail computer vision

Modules:

- `retail_cv.k8s`: A job notebook as a Kubernetes `batch/v1` Job: the runner's command in the image, resources, the workspace on a volume, checked against the official API schema; GPU scheduling the Run:ai way, and multi-node DDP training.
- `retail_cv.pipeline`: A small YAML file of job steps and what each needs from the others, run in order with every step cached by content: an unchanged step is not run again, a changed one re-runs with everything downstream of it.
- `retail_cv.tracking`: The W&B runs training logged offline into the workspace: list them, and upload them with `wandb sync` when a server is there, failing in seconds with one clear line when it is not."""

__version__ = "0.1.0"
