"""MLflow: `tracker` (runs that never fail the job because the store did), `journal` (the
run folder's own record, synced to MLflow later), `media` (PNG, mp4, usage plots),
`server` (a local MLflow server); and `progress`, the console lines of long verbs. Imports
libraries only."""
