"""Pure PyTorch encoders (no Spark): what the pandas UDFs in :mod:`recsys.inference` call."""
