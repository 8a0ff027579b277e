"""The collector: consumes interactions and feedback, stores them exactly once.

Records that fail validation (or that PostgreSQL refuses) go to the dead-letter
topic with the reason and the original bytes; offsets are committed only after the
rows are committed and the dead letters acknowledged.
"""
