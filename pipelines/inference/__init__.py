"""Using a trained model: `evaluate` (metrics and grids over batches: also run inside
training), `batch_infer` (Ray Data actors over shards), `tokenize` (`vqtok tokenize` /
`detokenize`), `eval_job` (`vqtok eval`). Imports store, cluster, config, data, tracking."""
