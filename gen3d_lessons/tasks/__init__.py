"""What a user calls on volumes and files: segment, register, denoise, detect anomalies, ask a
counterfactual, measure generated samples (the yardstick) and check that the measure measures
(sensitivity).

Each module here puts models, training, data, metrics and baselines together for one job.
Chapters and the CLI call these; nothing below them (models, training, data, metrics) imports them.
"""
