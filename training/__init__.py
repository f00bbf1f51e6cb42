"""The training core: one loop for pretraining, SFT and DPO (``loop.Trainer``), the objective
interface each kind of training implements, DeepSpeed wiring, checkpoints, the lr schedule and
the callbacks that watch a run. Stages import it; it imports no stage."""
