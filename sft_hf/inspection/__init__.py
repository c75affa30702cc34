"""Look at the data before spending compute on it: `sft-hf inspect` (examples token by token, as the collator feeds
them) and `sft-hf report` (lengths, truncation, padding, trained tokens, duplicates)."""
