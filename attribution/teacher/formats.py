"""Names of the teacher's numerical formats, in stage cache keys (``stage_table.py``) so a
cache made under another format is not reused.  Plain constants: importing them loads no torch.
"""

# how candidate noise ε is generated (attribution/teacher/noise.py): counter-based hashing
NOISE_VERSION = "counter-v1"

# the teacher settings that make its Fisher: a second teacher differing in any of them fits
# its own (teacher/second.py); the Fisher's cache key hashes them (stage_table.py), the
# precision only when reduced
FISHER_KEYS = ("fisher", "params", "fisher_epochs", "fisher_items", "fisher_precision")
