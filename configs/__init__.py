"""Training configurations (ml_collections): `common.py` is the schema every config overrides."""
