"""Ray and the machines: `connect` (join the submitted-to cluster or start a private
local Ray), `local` (`vqtok cluster up/down/status`: a Ray head and an MLflow server on
one machine), `submit` (`vqtok submit`: a command as a Ray job, its log followed), `procs`
(the processes they start). Imports `pipelines.tracking` only."""
