"""Comparisons over many runs: `ablation*` (`vqtok ablate` and the results pages),
`tune*` (`vqtok tune`: Ray Tune over the quantizer's hyperparameters), `quantizer_table`
(`vqtok quantizers`). Imports training and everything below."""
