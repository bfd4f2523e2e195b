"""The write path: receivers decode and validate, the batcher bounds and batches, the sink inserts."""
