"""The capture: everything that touches Keras tensors while a model trains.

`callback` is the user's one line (`ICSCallback`); `layers` chooses which
layers to capture; `intercept` collects their tensors during a call;
`stats` holds the statistics kernels; `program` compiles the probe capture;
`batch_stats` measures the training batches inside the training step;
`backend` is the one backend-specific module. Results go to `icsviz.store`.
"""
