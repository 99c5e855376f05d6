"""Training: `launch` (`vqtok train`, checks, Ray Train's trainer), `sessions` (where the
loop runs: one process or a Ray Train worker), `loop` (steps, evaluation, checkpoints),
`objectives` (what one step optimises, per model), `parallel` (DeepSpeed engines). Imports
inference (evaluation during training), store and everything below."""
