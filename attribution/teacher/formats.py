"""Names of the teacher's numerical formats, in stage cache keys (``stage_table.py``) so a
cache made under another format is not reused.  Plain constants: importing them loads no torch.
"""

# how candidate noise ε is generated (attribution/teacher/noise.py): counter-based hashing
NOISE_VERSION = "counter-v1"
