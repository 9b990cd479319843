"""Reading shards (folder listing, tar streams, metadata parquet) and writing results."""
