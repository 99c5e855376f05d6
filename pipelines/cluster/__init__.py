"""Ray and the machines: `connect` (join the submitted-to cluster or start a private
local Ray), `local` (`vqtok cluster up/down/status`: a Ray head and an MLflow server on
one machine), `procs` (the processes they start). Imports `pipelines.tracking` only."""
