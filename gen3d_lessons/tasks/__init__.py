"""What a user calls on files and volumes: segment, register, detect anomalies, measure generated samples.

Each module here puts models, training and data together for one job. Chapters and the CLI call these;
nothing below them (models, training, data, metrics) imports them.
"""
