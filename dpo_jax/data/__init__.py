"""Preference data: records -> examples -> token ids -> static-shape batches.

sources    JSON / JSONL(.gz) / parquet / HF save_to_disk readers, with file + line;
           parse_records, the one record -> example path
formats    TRL standard, implicit prompt, conversational, Anthropic HH, unpaired, SFT
tokenize   the paper's ("reference") and TRL's ("joint") tokenization and truncation
batching   padded [B, 2, L] and packed [R, L] pair batches, SFT batches, unpaired (KTO)
           batches with in-batch KL sequences
pipeline   grain: seeded shuffle, epochs, per-process shards of tokenized items
batch_iterator  batches from the stream, with an exact checkpointable state
tfds_builders  array_record TFDS builders (generic files, hh_rlhf), no TensorFlow
synthetic  the quickstart's self-generated toy task and character tokenizer
reviews    the sentiment experiment's generated movie reviews and BPE tokenizer
examples   the dataclasses these modules exchange, and RecordError
"""
