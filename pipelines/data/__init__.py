"""Data, in the order it flows: `tars` (list and read shards) -> `decode` (bytes -> frames)
-> `sampling` (one (resolution, frames) draw per batch) -> `batches` (fixed-shape uint8
batches, plain iterator or Ray Data) -> `inputs` (batches -> model input). Writing:
`shards` (`vqtok shards`), `demo_data`; reading for people: `inspect`. Imports vqcore and
libraries only."""
