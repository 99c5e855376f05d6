"""What training leaves on disk, and how it is read back safely: `checkpoint` (the
`step_N` format, manifests, weights-only loading), `models` (exported MLflow models and
`load_model` for any URI, run, checkpoint or folder), `pyfunc` (the MLflow pyfunc entry).
Both training (resume, export, teachers) and inference (load) use it, so it sits below
both. Imports `pipelines.data` and vqcore."""
