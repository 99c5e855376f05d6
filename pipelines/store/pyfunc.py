"""MLflow "models from code" entry of an exported vqtok tokenizer (see `model_store`).

    codes = mlflow.pyfunc.load_model("runs:/<id>/model").predict(video_uint8)

`predict` takes uint8 video `(B, 3, T, H, W)` (or images `(B, 3, H, W)`) and returns the
codes of every quantizer level as int64 numpy arrays, named as in token shards (`l0`, …).
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
from mlflow.models import set_model


class TokenizerPyfunc(mlflow.pyfunc.PythonModel):
    # no MLflow schema validation by type hint (the model checks its own input): MLflow
    # 3's PythonModel.__init_subclass__ skips the check, and its warning, on this attribute
    _skip_type_hint_validation = True

    def load_context(self, context):

        from pipelines.store.models import CONFIG, WEIGHTS, build_from_files

        config = Path(context.artifacts[CONFIG])
        self.model = build_from_files(Path(context.artifacts[WEIGHTS]), config)
        self.video = self.model.config.takes_clips

    def predict(self, context, model_input, params=None):
        import torch

        from pipelines.data.inputs import fold_frames, to_model_input
        from pipelines.store.models import flatten_codes

        x = to_model_input(torch.as_tensor(model_input), torch.device("cpu"))
        with torch.no_grad():
            codes = self.model.tokenize(x if self.video or x.dim() == 4 else fold_frames(x))
        return {k: v.numpy() for k, v in flatten_codes(codes).items()}


set_model(TokenizerPyfunc())
