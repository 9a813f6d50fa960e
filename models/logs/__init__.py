"""Log streams: Drain3 templates, a per-stream GRU over (template, level, timing), calibrated scores.

Layout (pure: no Kafka, no HTTP):
  templates.py   Drain3 miner per partition, JSON state, template id -> embedding row
  model.py       the network, its config and checkpoints
  detector.py    one step (`advance`, differentiable), the per-stream state bank
  calibration.py evidence -> score in [0, 1], per stream, with warm-up
  online.py      `LogDetector.process`: wavefronts between fixed online-learning update points
  partition.py   one partition's whole log model: miner + detector + streams, snapshot/restore
  synth.py       synthetic services with injected anomalies (tests, pretraining, demo)

No pretrained weights are bundled: a partition starts from the deterministic initialisation
of LogGRU(LogModelConfig()) and learns its templates online (online.py).
"""
