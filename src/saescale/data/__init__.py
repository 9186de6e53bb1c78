"""The activation cache: shuffled Parquet shards of LM activations plus a JSON manifest."""
