"""Notebook-first research-to-production framework for retail computer vision

## Packages

The map of the code is `ARCHITECTURE.md` (layers, the walk of one image, every module). Import public names from
these packages and modules, bottom layer first:

- `retail_cv.core`: errors, atomic writes, hashing, canonical JSON, time stamps, seeding, typed settings, workspace
- `retail_cv.preprocess`, `retail_cv.profiles`, `retail_cv.models`: the contract around a model: inputs, device profiles, architectures
- `retail_cv.bundle`, `retail_cv.credentials`: signed edge bundles; signed bearer tokens with scopes
- `retail_cv.data` (`formats`, `synth`, `validate`, `privacy`, `store`, `loading`): datasets in, checked, anonymised, versioned, loaded
- `retail_cv.runtime`, `retail_cv.registry`: running a bundle on a device; model versions, aliases, lineage, signed audit
- `retail_cv.agent`, `retail_cv.apps`: the device's update agent (A/B slots, watchdog, drop folders, fleet client); barcode inventory, shelf audit, picking, returns
- `retail_cv.train` (and `retail_cv.train.callbacks`), `retail_cv.evaluate`, `retail_cv.jobs`, `retail_cv.tracking`: training, measuring, job runs, W&B
- `retail_cv.tune`, `retail_cv.export`, `retail_cv.pipeline`, `retail_cv.k8s`, `retail_cv.serve`, `retail_cv.fleet`: search, export, job DAGs, Kubernetes, the HTTP service, the fleet server
- `retail_cv.monitor`: drift of live traffic against the bundle's reference, alerts
- `retail_cv.demo`, `retail_cv.docs`, `retail_cv.cli`: the demo walk, the docs site, the `retail-cv` command

Modules:

- `retail_cv.k8s`: A job notebook as a Kubernetes `batch/v1` Job, and `retail-cv serve` as a Deployment, a Service and a HorizontalPodAutoscaler: the project's images by default, non-root, secrets only by reference, checked against the official API schema; GPU scheduling the Run:ai way, and multi-node DDP training.
- `retail_cv.pipeline`: A small YAML file of job steps and what each needs from the others, run in order with every step cached by content: an unchanged step is not run again, a changed one re-runs with everything downstream of it.
- `retail_cv.tracking`: The W&B runs training logged offline into the workspace: list them, and upload them with `wandb sync` when a server is there, failing in seconds with one clear line when it is not."""

__version__ = "0.1.0"
