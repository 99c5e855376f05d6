"""vqtok's application on Ray: shards -> decode -> sample -> batch -> step -> metrics -> MLflow.

Rooms, lowest first; a room imports its own modules and lower rooms only, never a peer
(`tests/test_layout.py` checks every import, lazy ones included):

    data/       tars, decode, sampling, batches (plain and Ray Data), shard writing,
                inspect, demo data, model input                         -> vqcore
    tracking/   the MLflow tracker, its journal, media, the MLflow server
    config.py   the typed run config                                    -> data
    cluster/    Ray connection, the local cluster (`vqtok cluster`), processes -> tracking
    store/      checkpoints and exported models, read and written       -> data
    inference/  evaluation as a library, batch inference, tokenize, `vqtok eval`
    training/   launch, sessions, loop, objectives, DeepSpeed engines -> inference, store
    studies/    ablations, their pages, Tune, the quantizer table      -> training
    demo.py, cli.py
"""
